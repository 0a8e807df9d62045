"""Planning, plan reading, the committed-shard lookup and the aggregate at 1 M to 100 M images.

    python -m benchmarks.scale --images 1000000 --images 10000000
    python -m benchmarks.scale --images 100000000 --skip-aggregate --json scale-100m.json
    python -m benchmarks.scale --images 10000000 --layout packed --skip-aggregate
    python -m benchmarks.scale --images 10000000 --incremental

A synthetic storage back-end stands in for the input bucket: it lists N generated names (nested
prefixes ``year/month/day/camera-NNN/``, ~75-character URIs, pages of 1,000 in a scattered order,
as a fanned-out listing returns them) without an emulator or any object behind them. Everything
else is the real code on local disk: rank 0's planning (``OutputGuard.plan`` and ``seal``: the
listing streamed into DuckDB, sorted, written as the plan's pieces and index), a rank reading the
plan rows of every shard it is given (``worker.read.batches`` over ``PlanReader``, static
assignment over 16 ranks), the committed-shard lookup (``Committer.scan`` over one part per
shard), and the aggregate (``components.aggregate.aggregate``) over parts written for every
image (1 % error rows). Each stage runs in a fresh process; its peak RSS is that process's
``VmHWM``. A rank's *plan memory* is its peak RSS less its RSS before it opened the plan.
``--layout packed`` plans a packed dataset of the same images instead (the upload step's layout:
a manifest and an index per 3,200-image shard, generated as they are read).
``--incremental`` makes the first run an incremental one (with no base yet) and adds a second
after the input changed (1 % of the images written again, 0.5 % deleted, 0.5 % added): its
planning against the first run's manifest, and its aggregate with the carried-over rows.
Figures go in benchmarks/NOTES.md; ``--json FILE`` writes them for one size.
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
from collections.abc import Iterator
from pathlib import Path

from worker.archives import packed
from worker.storage import GCS, ObjectInfo, StorageOptions, register

ROOT = Path(__file__).resolve().parents[1]
INPUT = "gs://synthetic-images/archive"
RANKS = 16
SHARD = 1024
PAGE = 1000
# Images per packed shard: 256 MB (the upload step's default) of ~80 KB images.
PACKED_MEMBERS = 3_200
CLASSES = [f"class {i:03d}" for i in range(1000)]
# The input's change before an incremental run (``--incremental``): one image in CHANGED written
# again, one in DELETED deleted, and one new image for every ADDED.
CHANGED, DELETED, ADDED = 100, 200, 200
_STAGES = ("plan", "rank", "parts", "committed", "aggregate")


def synthetic_name(i: int) -> str:
    """Image ``i``'s URI: nested date and camera prefixes, ~75 characters."""
    day = i // 50_000
    return (
        f"{INPUT}/{2000 + day // 365}/{day // 31 % 12 + 1:02d}/{day % 31 + 1:02d}/"
        f"camera-{i % 997:03d}/IMG_{i:010d}_{(i * 2654435761) % 2**32:08x}.jpg"
    )


class SyntheticBucket:
    """A gs:// back-end that lists ``SCALE_IMAGES`` generated objects and holds nothing else; with
    ``SCALE_LAYOUT=packed``, a packed dataset of them instead (the upload step's layout): a
    manifest, and an index per shard generated when it is read.
    """

    def __init__(self, options: StorageOptions | None = None):
        self.images = int(os.environ["SCALE_IMAGES"])
        self.changed = os.environ.get("SCALE_CHANGED") == "1"
        self.packed = os.environ.get("SCALE_LAYOUT") == "packed"
        self.shards = -(-self.images // PACKED_MEMBERS)

    def list_pages(self, prefix_uri: str, parallelism: int = 8) -> Iterator[list[ObjectInfo]]:
        # Pages in a scattered order (a stride coprime to the page count), as a fanned-out
        # listing returns its prefixes: the plan's sort has real work to do.
        listed = self.images + (self.images // ADDED if self.changed else 0)
        pages = -(-listed // PAGE)
        stride = next(s for s in range(7919, 7919 + 10_000) if _coprime(s, pages))
        for k in range(pages):
            first = (k * stride) % pages * PAGE
            yield [
                ObjectInfo(synthetic_name(i), 60_000 + i % 40_000, self._generation(i))
                for i in range(first, min(first + PAGE, listed))
                if not (self.changed and i % DELETED == 1)
            ]

    def _generation(self, i: int) -> int:
        """Image ``i``'s generation: after the change (``SCALE_CHANGED=1``) every ``CHANGED``-th
        image has been written again."""
        return 1_700_000_000_000_000 + i + (1 if self.changed and i % CHANGED == 0 else 0)

    def exists(self, uri: str) -> bool:
        return self.packed and uri == packed.manifest_uri(INPUT)  # no archive

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        """A packed dataset's shard objects."""
        for n in range(self.shards if self.packed else 0):
            size = _packed_shard(n, self.images).size
            yield ObjectInfo(
                f"{packed.packed_dir(INPUT)}/{packed.shard_name(n)}", size, 1_700_000_000_000_000 + n
            )

    def read(self, uri: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """A packed dataset's manifest or a shard's index."""
        if uri == packed.manifest_uri(INPUT):
            records = [
                packed.ShardRecord(packed.shard_name(n), packed.index_name(n), PACKED_MEMBERS, 0)
                for n in range(self.shards)
            ]
            return packed.Manifest(records).encode()
        number = int(uri.rsplit("shard-", 1)[1].split(".", 1)[0])
        return _packed_shard(number, self.images).encode()

    def stat(self, uri: str) -> None:
        return None


def _packed_shard(number: int, images: int):
    """Packed shard ``number``'s index: images ``number * PACKED_MEMBERS`` on, as tar members."""
    members, offset = [], 0
    for i in range(number * PACKED_MEMBERS, min((number + 1) * PACKED_MEMBERS, images)):
        size = 60_000 + i % 40_000
        members.append(packed.IndexEntry(synthetic_name(i)[len(INPUT) + 1 :], offset + 512, size, "AAAAAA=="))
        offset += 512 + -(-size // 512) * 512
    return packed.ShardIndex(packed.shard_name(number), offset + 1024, "AAAAAA==", members)


def _coprime(a: int, b: int) -> bool:
    while b:
        a, b = b, a % b
    return a == 1


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    """This process's peak RSS (``VmHWM``). Not ``ru_maxrss``: Linux carries the parent's peak into
    a child across fork and exec, so a stage started from a big process would report that one's.
    """
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return kib / 1024


def _config(out: Path, incremental: bool):
    from worker.config import parse_args

    # The model is a folder that exists, the same for both runs of an incremental pair.
    args = ["--input", INPUT, "--output", str(out), "--model", str(out.parent)]
    args += ["--shard-size", str(SHARD), "--device", "cpu"]
    return parse_args(args + (["--incremental"] if incremental else []))


# Stages, each in a child process (``--stage``); each prints one JSON line of figures.


def stage_plan(out: Path, incremental: bool) -> dict:
    from worker.fingerprint import OutputGuard

    register(GCS, "benchmarks.scale:SyntheticBucket")
    guard = OutputGuard(_config(out, incremental), "cpu")
    plan = guard.plan(lambda: "sha256:benchmark")
    fingerprint, committed = guard.seal(plan, "sha256:benchmark")
    return {"images": plan.images, "fingerprint": fingerprint, "pieces": len(plan.index.pieces)}


def stage_rank(out: Path, rank: int) -> dict:
    from worker.plan import make_shards, static_assignment
    from worker.plan_store import PlanReader, read_index
    from worker.read import batches
    from worker.results import PLAN_DIR
    from worker.storage import join

    before = _rss_mib()
    # What a rank gets: the index (rank 0 broadcasts its bytes), then its shards' rows.
    index, _ = read_index(join(str(out), PLAN_DIR))
    plan = PlanReader(join(str(out), PLAN_DIR), index)
    mine = static_assignment(make_shards(index.images, index.shard_size), rank, RANKS)
    images = sum(len(b.objects) for b in batches(plan, mine, 256))
    return {"rank": rank, "images": images, "plan_mib": round(_peak_mib() - before, 1)}


def stage_parts(out: Path, fingerprint: str) -> dict:
    """Write a part (and for 1 % of the images an error file) per shard, as the worker would."""
    from worker.plan import make_shards
    from worker.plan_store import PlanReader, read_index
    from worker.results import PLAN_DIR, part_name
    from worker.storage import join

    index, _ = read_index(join(str(out), PLAN_DIR))
    plan = PlanReader(join(str(out), PLAN_DIR), index)
    (out / "parts").mkdir(exist_ok=True)
    (out / "errors").mkdir(exist_ok=True)
    for shard in make_shards(index.images, index.shard_size):
        rows, errors = [], []
        for j, o in enumerate(plan.objects(shard.index)):
            i = shard.start + j
            if i % 100 == 99:
                errors.append((o.uri, "cannot identify image file"))
            else:
                label = (i * 7919) % len(CLASSES)
                rows.append((f"IMG_{i:010d}", CLASSES[label], label, round((i % 997) / 997, 6), o.uri))
        name = part_name(shard.index, fingerprint)
        for folder, header, body in (
            ("errors", ("uri", "reason"), errors),
            ("parts", ("image_id", "classification", "label_index", "score", "uri"), rows),
        ):
            with open(out / folder / name, "w", newline="") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(body)
    (out / "summary").mkdir(exist_ok=True)
    for rank in range(RANKS):
        summary = {"rank": rank, "world_size": RANKS, "images": index.images // RANKS, "seconds": 600.0}
        (out / "summary" / f"rank-{rank}.json").write_text(json.dumps(summary | {"device": "cuda"}))
    return {"shards": plan.shards}


def stage_committed(out: Path, fingerprint: str) -> dict:
    from worker.commit import Committer

    committed, foreign = Committer(str(out), fingerprint).scan()
    return {"committed": len(committed), "foreign": len(foreign)}


def stage_aggregate(out: Path, artifacts: Path) -> dict:
    from components.aggregate.aggregate import aggregate

    report = aggregate(
        str(out),
        csv_path=str(artifacts / "results.csv"),
        parquet_path=str(artifacts / "results.parquet"),
        errors_path=str(artifacts / "errors.csv"),
        html_path=str(artifacts / "report.html"),
    )
    m = report.metrics
    # Every planned image is a row or an error; an incremental run's rows add the carried ones.
    assert report.complete and m["rows"] + m["errors"] == m["images"] + m["reused"]
    return {"rows": m["rows"], "errors": m["errors"], "reused": m["reused"]}


def _child(
    stage: str, images: int, scratch: Path, *args: str, changed: bool = False
) -> tuple[dict, float, float]:
    """Run one stage in a fresh process (``changed``: after the input changed): (its figures,
    seconds, its peak RSS in MiB)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(scratch), SCALE_IMAGES=str(images))
    env["SCALE_CHANGED"] = "1" if changed else "0"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--stage", stage, "--scratch", str(scratch), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"stage {stage} at {images:,} images failed")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return figures, seconds, figures.pop("peak_rss_mib")


def measure(images: int, scratch: Path, *, aggregate: bool = True, incremental: bool = False) -> dict:
    """Every stage at ``images`` images; with ``incremental``, the first run is an incremental one
    (with no base yet), and a second one follows after the input changed (``CHANGED``...).
    """
    out, artifacts = scratch / "runs" / "run-1", scratch / "artifacts"
    artifacts.mkdir(parents=True)
    stages: dict[str, dict] = {}
    mode = ["incremental"] if incremental else []

    def run(name: str, stage: str, *args: str, changed: bool = False) -> dict:
        figures, seconds, peak = _child(stage, images, scratch, *args, changed=changed)
        stages[name] = {"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1), **figures}
        print(f"{images:>12,} {name:<26} {seconds:>9.1f} {peak:>10.0f}", flush=True)
        return figures

    planned = run("plan (rank 0)", "plan", str(out), *mode)
    assert planned["images"] == images
    for rank in (1, RANKS - 1):
        run(f"plan read (rank {rank}/{RANKS})", "rank", str(out), str(rank))
    if aggregate:
        run("write parts (setup)", "parts", str(out), planned["fingerprint"])
        found = run("committed-shard lookup", "committed", str(out), planned["fingerprint"])
        assert found["committed"] == -(-images // SHARD)
        run("aggregate", "aggregate", str(out), str(artifacts))
    if aggregate and incremental:
        second = out.with_name("run-2")
        planned = run("incremental plan", "plan", str(second), *mode, changed=True)
        # The changed and the new images, and those of the first run's error rows still listed.
        changed = len(range(0, images, CHANGED)) + images // ADDED
        assert changed <= planned["images"] <= changed + images // 100, planned
        run("incremental parts (setup)", "parts", str(second), planned["fingerprint"], changed=True)
        run("incremental aggregate", "aggregate", str(second), str(artifacts), changed=True)
    ranks = [s for name, s in stages.items() if name.startswith("plan read")]
    return {
        "images": images,
        "rank0_peak_rss_mib": stages["plan (rank 0)"]["peak_rss_mib"],
        "rank_plan_mib": max(s["plan_mib"] for s in ranks),
        "aggregate_peak_rss_mib": stages["aggregate"]["peak_rss_mib"] if aggregate else None,
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, action="append", help="planned images (repeatable; default 1M, 10M)")
    p.add_argument(
        "--skip-aggregate", action="store_true", help="plan and plan reads only (no parts written)"
    )
    p.add_argument(
        "--layout",
        choices=("loose", "packed"),
        default="loose",
        help=f"the input: loose objects, or a packed dataset of {PACKED_MEMBERS:,}-image shards",
    )
    p.add_argument(
        "--incremental",
        action="store_true",
        help="plan and aggregate an incremental run too, after 1 %% of the images changed and 0.5 %% were "
        "deleted and added",
    )
    p.add_argument("--json", help="write the figures of the (last) size to this file")
    p.add_argument("--scratch", help="folder for the results prefix and the stages' spill (default: TMPDIR)")
    p.add_argument("--stage", choices=_STAGES, help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        # A stage's progress (the aggregate's loading, ETA) goes to stderr; its figures to stdout.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
        out = Path(args.args[0])
        run = {
            "plan": lambda: stage_plan(out, "incremental" in args.args[1:]),
            "rank": lambda: stage_rank(out, int(args.args[1])),
            "parts": lambda: stage_parts(out, args.args[1]),
            "committed": lambda: stage_committed(out, args.args[1]),
            "aggregate": lambda: stage_aggregate(out, Path(args.args[1])),
        }[args.stage]
        print(json.dumps(run() | {"peak_rss_mib": round(_peak_mib(), 1)}))
        return 0
    sizes = sorted(args.images or [1_000_000, 10_000_000])
    os.environ["SCALE_LAYOUT"] = args.layout  # the stages' synthetic bucket reads it
    print(
        f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    )
    print(f"{'images':>12} {'stage':<26} {'seconds':>9} {'peak MiB':>10}")
    figures = None
    for images in sizes:
        scratch = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.scratch))
        try:
            figures = measure(
                images, scratch, aggregate=not args.skip_aggregate, incremental=args.incremental
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        s = figures["stages"]
        print(
            f"{images:>12,} rank 0 peak {figures['rank0_peak_rss_mib']:.0f} MiB, a rank's plan memory "
            f"{figures['rank_plan_mib']:.0f} MiB, planning {s['plan (rank 0)']['seconds'] / images * 1e6:.1f} s "
            "per million",
            flush=True,
        )
        if "incremental aggregate" in s:
            print(
                f"{images:>12,} incremental run: {s['incremental plan']['images']:,} images planned, "
                f"{s['incremental aggregate']['reused']:,} rows carried over",
                flush=True,
            )
    if args.json and figures:
        Path(args.json).write_text(json.dumps({"layout": args.layout, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
