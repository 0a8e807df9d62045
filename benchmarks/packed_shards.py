"""Packed shards against loose objects from gs://: ``python -m benchmarks.packed_shards``.

In one run, on any machine (a GPU machine for issue 16's figures; ``--device cpu --images 512``
for a quick check anywhere):

1. Generates COCO-like JPEGs (``benchmarks.classifier``) and a random-weight ViT-B/16
   (``--tiny``: a 2-layer ViT), and starts fake-gcs-server on loopback.
2. Uploads the images to one prefix packed and the first ``--loose-images`` of them loose too
   (``upload_dataset``), timing each: the packing throughput in images/s.
3. Warms the emulator up: reads every shard once with obstore, untimed but printed. The first
   large reads from a freshly filled fake-gcs-server run at ~60 % of later ones (its process, not
   the objects: any first pass is slow), which no real bucket does.
4. ``--rounds`` times, the conditions in a rotated order each round (so drift and warm-up hit
   every condition alike): the worker from local disk, then for each added latency
   (``--delays``, ms per request) through a proxy (``tests.support.gcs_proxy``: it adds the delay
   to every request and counts requests and response bytes) the real worker (``python -m
   worker``, its own process) from gs:// on the packed shards and on the loose objects.

It prints one table: per condition, requests and bytes per image (counted at the proxy, so
listing, indexes and retries included), the mean end-to-end img/s and its range over the rounds,
GPU busy (the worker's summary), and the mean over the local-disk mean; whether every run
classified every image exactly once; and whether the loose and packed runs at each delay wrote
the same rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.classifier import bench_images
from pipelines.dev.emulator import gcs_emulator
from pipelines.dev.random_model import make_model
from tests.support.gcs_proxy import Faults, GcsProxy

log = logging.getLogger("benchmarks.packed_shards")

BUCKET = "packed-bench"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def loose_subset(images: Path, paths: list[Path], n: int, work: Path) -> Path:
    """A folder with the first ``n`` images at their relative paths (hard links): what goes up loose."""
    root = work / f"loose-{n}"
    shutil.rmtree(root, ignore_errors=True)
    for path in paths[:n]:
        target = root / path.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    return root


def upload_both(images: Path, loose: Path | None, prefix: str, shard_mb: int) -> dict[str, float]:
    """Upload ``loose`` (if any) loose and ``images`` packed to ``prefix``; the images/s and MB/s of each."""
    from components.upload.upload import upload_dataset

    figures = {}
    for layout, source in (("loose", loose), ("packed", images)):
        if source is None:
            continue
        start = time.perf_counter()
        report = upload_dataset(str(source), prefix, layout=layout, shard_mb=shard_mb, workers=16)
        seconds = time.perf_counter() - start
        figures[f"{layout}_uploaded_images"] = report.total_objects
        figures[f"{layout}_upload_images_per_s"] = report.total_objects / seconds
        figures[f"{layout}_upload_mb_per_s"] = report.total_bytes / 1e6 / seconds
        if layout == "packed":
            figures["shards"] = report.shards_written
    return figures


def run_worker(input_uri: str, out: Path, model: Path, args, *, layout: str, env: dict) -> dict:
    """One worker process over ``input_uri``; its summary, and its wall time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "--input",
        input_uri,
        "--output",
        str(out),
        "--model",
        str(model),
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--shard-size",
        str(4 * args.batch_size),
        "--compile",
        args.compile,
        "--input-layout",
        layout,
        "--log-interval",
        "5",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **NO_MULTICAST, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    summary = json.loads((out / "summary" / "rank-0.json").read_text())
    summary["wall_seconds"] = wall
    log.info(
        "%s (%s): %.0f img/s, GPU busy %.2f, %d images, %.1fs wall",
        input_uri,
        layout,
        summary["images_per_second"],
        summary.get("gpu_busy", 0.0),
        summary["images"],
        wall,
    )
    return summary


def read_rows(out: Path) -> dict[str, tuple]:
    """uri -> the rest of its row, from every part (a duplicate row fails the benchmark)."""
    rows: dict[str, tuple] = {}
    for part in sorted((out / "parts").glob("*.csv")):
        with part.open() as fh:
            for row in csv.DictReader(fh):
                if row["uri"] in rows:
                    raise AssertionError(f"duplicate row for {row['uri']}")
                rows[row["uri"]] = (row["image_id"], row["classification"], row["label_index"], row["score"])
    return rows


def error_uris(out: Path) -> set[str]:
    uris = set()
    for part in (out / "errors").glob("*.csv"):
        with part.open() as fh:
            uris |= {row["uri"] for row in csv.DictReader(fh)}
    return uris


def warm_up_emulator(prefix: str, passes: int = 2) -> list[float]:
    """Read every shard of the packed dataset ``passes`` times with obstore (from the emulator that
    ``gcs_emulator`` points the clients at): the MB/s of each pass.
    """
    from benchmarks.packed_read import native_ceiling
    from worker.archives.packed import packed_dir
    from worker.storage import open_storage

    shards = [
        (o.uri, o.size) for o in open_storage(prefix).list(packed_dir(prefix)) if o.uri.endswith(".tar")
    ]
    rates = []
    for _ in range(passes):
        seconds, nbytes = native_ceiling(shards, 8 << 20, 8)
        rates.append(nbytes / seconds / 1e6)
    return rates


def conditions(delays: list[int], loose: bool) -> list[tuple[str, int | None, str]]:
    """(name, delay or None for local disk, layout) of every condition a round runs."""
    out = [("local disk", None, "loose")]
    for delay in delays:
        out += [(f"gs:// {layout}, {delay} ms", delay, layout) for layout in ("packed", "loose")[: 1 + loose]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.packed_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=24576, help="JPEGs to generate (all packed)")
    p.add_argument(
        "--loose-images",
        type=int,
        default=4096,
        help="of them, uploaded loose too (the first ones; 0: no loose runs): fake-gcs-server's memory "
        "backend takes new objects ever more slowly, about 100 a second past 15,000, while one shard is "
        "one object",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on cuda, 32 on cpu")
    p.add_argument("--delays", default="0,50", help="ms added per request, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="runs of every condition, in rotated orders")
    p.add_argument("--shard-mb", type=int, default=256, help="the packed layout's shard size")
    p.add_argument("--tiny", action="store_true", help="a 2-layer ViT instead of ViT-B/16 (quick CPU runs)")
    p.add_argument("--compile", default="none", help="the worker's --compile (none: shorter start-up)")
    p.add_argument("--workdir", default=None, help="where images, model and outputs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (256 if args.device == "cuda" else 32)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="packed-bench-"))
    images = work / "images"
    paths = bench_images(images, args.images)
    model = make_model(work / ("vit-tiny" if args.tiny else "vit-base-patch16-224-random"), tiny=args.tiny)
    delays = [int(d) for d in args.delays.split(",")]
    todo = conditions(delays, bool(args.loose_images))
    figures: dict = {"device": _device_name(args.device), "images": len(paths), "batch_size": args.batch_size}
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in todo}
    prefix = f"gs://{BUCKET}/dataset"
    expected = {
        "packed": {f"{prefix}/{p.relative_to(images).as_posix()}" for p in paths},
        "loose": {f"{prefix}/{p.relative_to(images).as_posix()}" for p in paths[: args.loose_images]},
        "local": {str(p) for p in paths},
    }

    with gcs_emulator(buckets=(BUCKET,)) as emulator:
        loose = loose_subset(images, paths, args.loose_images, work) if args.loose_images else None
        figures.update(upload_both(images, loose, prefix, args.shard_mb))
        figures["emulator_warm_up_mb_per_s"] = warm_up_emulator(prefix)
        log.info("uploads: %s", figures)
        for round_ in range(args.rounds):
            shift = round_ % len(todo)
            for name, delay, layout in todo[shift:] + todo[:shift]:
                out = work / "out" / f"{name}, round {round_}"
                if delay is None:
                    s = run_worker(str(images), out, model, args, layout="loose", env={})
                    s.update(requests=None, bytes=None, want=expected["local"])
                else:
                    with GcsProxy(emulator, Faults(delay=delay / 1e3)) as proxy:
                        env = {"STORAGE_EMULATOR_HOST": proxy.url}
                        s = run_worker(prefix, out, model, args, layout=layout, env=env)
                        s.update(requests=proxy.counters.requests, bytes=proxy.counters.bytes_out)
                    s["want"] = expected[layout]
                    log.info("%s: %d requests, %.1f MB at the proxy", name, s["requests"], s["bytes"] / 1e6)
                uris = set(read_rows(out)) | error_uris(out)
                s["exactly_once"] = uris == s["want"] and s["images"] == len(s["want"])
                s["out"] = out
                runs[name].append(s)

    local_rate = _mean(s["images_per_second"] for s in runs["local disk"])
    table = []
    for name, done in runs.items():
        want = len(done[0]["want"])
        rates = [s["images_per_second"] for s in done]
        requests = done[-1]["requests"]
        per_image = (
            ("", "")
            if requests is None
            else (f"{requests / want:.4f}", f"{done[-1]['bytes'] / want / 1e3:,.1f} KB")
        )
        busy = f"{100 * _mean(s.get('gpu_busy', 0) for s in done):.0f} %" if args.device == "cuda" else ""
        ratio = _mean(rates) / local_rate
        once = all(s["exactly_once"] for s in done)
        spread = f"{min(rates):,.0f}–{max(rates):,.0f}"
        table.append(
            (
                name,
                f"{want:,}",
                *per_image,
                f"{_mean(rates):,.0f}",
                spread,
                busy,
                f"{ratio:.3f}",
                "yes" if once else "NO",
            )
        )
        figures[name] = {
            "images_per_second": rates,
            "gpu_busy": [s.get("gpu_busy") for s in done],
            "requests": requests,
            "bytes": done[-1]["bytes"],
            "wall_seconds": [s["wall_seconds"] for s in done],
            "over_local_disk": ratio,
            "exactly_once": once,
        }
    for delay in delays if args.loose_images else ():
        packed, loose = (
            read_rows(runs[f"gs:// {lay}, {delay} ms"][-1]["out"]) for lay in ("packed", "loose")
        )
        # The loose run's images are the first of the packed run's; compare their rows.
        same = sum(packed.get(uri) == row for uri, row in loose.items())
        figures[f"rows equal, {delay} ms"] = f"{same}/{len(loose)}"

    print(
        f"\ndevice: {figures['device']}; {len(paths):,} JPEGs; batch {args.batch_size}; --compile {args.compile}; "
        f"{args.rounds} rounds"
    )
    print(
        f"upload to the emulator: loose {figures.get('loose_upload_images_per_s', 0):,.0f} images/s "
        f"({figures.get('loose_uploaded_images', 0):,} images), "
        f"packed {figures['packed_upload_images_per_s']:,.0f} images/s "
        f"({figures['packed_upload_mb_per_s']:,.0f} MB/s, {figures['shards']} shards of <= {args.shard_mb} MB)"
    )
    warm = figures["emulator_warm_up_mb_per_s"]
    print(f"emulator warm-up, obstore over every shard: {' then '.join(f'{r:,.0f}' for r in warm)} MB/s")
    print(
        "\n| condition | images | requests / image | bytes / image | img/s, mean | range | GPU busy "
        "| / local disk | exactly once |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    for delay in delays if args.loose_images else ():
        print(
            f"rows equal between loose and packed at {delay} ms (the loose run's images): {figures[f'rows equal, {delay} ms']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if all(r[-1] == "yes" for r in table) else 1


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _device_name(device: str) -> str:
    if device != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    import torch

    return f"{torch.cuda.get_device_name(0)} ({os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())
