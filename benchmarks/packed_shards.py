"""Packed shards against loose objects from gs://: ``python -m benchmarks.packed_shards``.

In one run, on any machine (a GPU machine for issue 16's figures; ``--device cpu --images 512``
for a quick check anywhere):

1. Generates COCO-like JPEGs (``benchmarks.classifier``) and a random-weight ViT-B/16
   (``--tiny``: a 2-layer ViT), and starts fake-gcs-server on loopback.
2. Uploads the images to one prefix packed and the first ``--loose-images`` of them loose too
   (``upload_dataset``), timing each: the packing throughput in images/s.
3. For each added latency (``--delays``, ms per request), puts a proxy in front of the emulator
   (``tests.support.gcs_proxy``: it adds the delay to every request and counts requests and
   response bytes) and runs the real worker (``python -m worker``, its own process) from gs://
   on the loose objects and on the packed shards.
4. Runs the worker from local disk, before the gs:// runs and after them.

It prints one table: per run, requests and bytes per image (counted at the proxy, so listing,
indexes and retries included), end-to-end img/s and GPU busy (the worker's summary), and img/s
over the local-disk mean; whether each run classified every image exactly once; and whether the
loose and packed runs at each delay wrote the same rows.
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
    figures: dict = {"device": _device_name(args.device), "images": len(paths), "batch_size": args.batch_size}
    runs: dict[str, dict] = {}
    prefix = f"gs://{BUCKET}/dataset"

    def local(name: str) -> None:
        runs[name] = run_worker(str(images), work / "out" / name, model, args, layout="loose", env={})
        runs[name].update(requests=None, bytes=None)

    with gcs_emulator(buckets=(BUCKET,)) as emulator:
        loose = loose_subset(images, paths, args.loose_images, work) if args.loose_images else None
        figures.update(upload_both(images, loose, prefix, args.shard_mb))
        log.info("uploads: %s", figures)
        local("local disk, before")
        for delay in delays:
            with GcsProxy(emulator, Faults(delay=delay / 1e3)) as proxy:
                for layout in ("packed", "loose") if loose else ("packed",):
                    name = f"gs:// {layout}, {delay} ms"
                    before = (proxy.counters.requests, proxy.counters.bytes_out)
                    runs[name] = run_worker(
                        prefix,
                        work / "out" / name,
                        model,
                        args,
                        layout=layout,
                        env={"STORAGE_EMULATOR_HOST": proxy.url},
                    )
                    runs[name].update(
                        requests=proxy.counters.requests - before[0],
                        bytes=proxy.counters.bytes_out - before[1],
                        delay=delay,
                        layout=layout,
                    )
                    log.info(
                        "%s: %d requests, %.1f MB at the proxy",
                        name,
                        runs[name]["requests"],
                        runs[name]["bytes"] / 1e6,
                    )
        local("local disk, after")

    local_rate = sum(runs[n]["images_per_second"] for n in runs if n.startswith("local")) / 2
    expected = {f"{prefix}/{p.relative_to(images).as_posix()}" for p in paths}
    expected_loose = {f"{prefix}/{p.relative_to(images).as_posix()}" for p in paths[: args.loose_images]}
    table = []
    for name, s in runs.items():
        out = work / "out" / name
        uris = set(read_rows(out)) | error_uris(out)
        want = {str(p) for p in paths}
        if name.startswith("gs"):
            want = expected_loose if s["layout"] == "loose" else expected
        once = "yes" if uris == want and s["images"] == len(want) else "NO"
        per_image = (
            ("", "")
            if s["requests"] is None
            else (f"{s['requests'] / len(want):.4f}", f"{s['bytes'] / len(want) / 1e3:,.1f} KB")
        )
        busy = f"{100 * s.get('gpu_busy', 0):.0f} %" if args.device == "cuda" else ""
        ratio = s["images_per_second"] / local_rate
        table.append(
            (name, f"{len(want):,}", *per_image, f"{s['images_per_second']:,.0f}", busy, f"{ratio:.3f}", once)
        )
        figures[name] = {
            k: s.get(k) for k in ("images_per_second", "gpu_busy", "requests", "bytes", "wall_seconds")
        }
        figures[name]["over_local_disk"] = ratio
        figures[name]["exactly_once"] = once
    for delay in delays if args.loose_images else ():
        packed, loose = (read_rows(work / "out" / f"gs:// {lay}, {delay} ms") for lay in ("packed", "loose"))
        # The loose run's images are the first of the packed run's; compare their rows.
        same = sum(packed.get(uri) == row for uri, row in loose.items())
        figures[f"rows equal, {delay} ms"] = f"{same}/{len(loose)}"

    print(
        f"\ndevice: {figures['device']}; {len(paths):,} JPEGs; batch {args.batch_size}; --compile {args.compile}"
    )
    print(
        f"upload to the emulator: loose {figures.get('loose_upload_images_per_s', 0):,.0f} images/s "
        f"({figures.get('loose_uploaded_images', 0):,} images), "
        f"packed {figures['packed_upload_images_per_s']:,.0f} images/s "
        f"({figures['packed_upload_mb_per_s']:,.0f} MB/s, {figures['shards']} shards of <= {args.shard_mb} MB)"
    )
    print(
        "\n| run | images | requests / image | bytes / image | img/s | GPU busy | / local disk | exactly once |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    for delay in delays if args.loose_images else ():
        print(
            f"rows equal between loose and packed at {delay} ms (the loose run's images): {figures[f'rows equal, {delay} ms']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = all(r[-1] == "yes" for r in table)
    return 0 if ok else 1


def _device_name(device: str) -> str:
    if device != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    import torch

    return f"{torch.cuda.get_device_name(0)} ({os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())
