"""Peak memory of the aggregate step at 1 M, 3 M and 10 M rows.

    python -m benchmarks.aggregate_memory                 # 1M, 3M and 10M rows
    python -m benchmarks.aggregate_memory --rows 1000000  # one size

For each size it writes a run's results prefix on local disk as the worker would (plan.jsonl,
one CSV part per 1,024-image shard, an error file for 1 % of the images, a summary per rank),
then aggregates it in a fresh process and prints that process's peak RSS and wall time. The
goal (issue 17) is a peak of at most 2 GiB at 10 M rows. Figures go in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker.results import FINGERPRINT_KEYS, RUN_FILE, part_name, plan_digest, sealed

SHARD = 1024
RANKS = 16
CLASSES = [f"class {i:03d}" for i in range(1000)]
ROOT = Path(__file__).resolve().parents[1]


def _uri(i: int) -> str:
    return f"gs://images/dataset/d{i % 100:02d}/{i:010d}.jpg"


def generate(out: Path, rows: int) -> None:
    """A results prefix of ``rows`` planned images, 1 % of them errors."""
    for folder in ("parts", "errors", "summary"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    with open(out / "plan.jsonl", "w") as plan:
        for i in range(rows):
            plan.write(
                f'{{"uri": "{_uri(i)}", "size": {100_000 + i % 5000}, "generation": {1_700_000_000_000_000 + i}}}\n'
            )
    # The record a worker seals for this plan; its fingerprint names the parts.
    made_from = {"input": "gs://images/dataset", "model": "m", "incremental": False}
    record = sealed(
        {key: None for key in FINGERPRINT_KEYS}
        | made_from
        | {"plan_sha256": plan_digest((out / "plan.jsonl").read_bytes())}
    )
    (out / RUN_FILE).write_text(json.dumps(record))
    for shard, start in enumerate(range(0, rows, SHARD)):
        parts, errors = io.StringIO(), io.StringIO()
        part_writer, error_writer = (
            csv.writer(parts, lineterminator="\n"),
            csv.writer(errors, lineterminator="\n"),
        )
        part_writer.writerow(["image_id", "classification", "label_index", "score", "uri"])
        error_writer.writerow(["uri", "reason"])
        for i in range(start, min(rows, start + SHARD)):
            if i % 100 == 99:
                error_writer.writerow([_uri(i), "cannot identify image file"])
            else:
                label = (i * 7919) % len(CLASSES)
                part_writer.writerow([f"{i:010d}", CLASSES[label], label, round((i % 997) / 997, 6), _uri(i)])
        (out / "errors" / part_name(shard, record["fingerprint"])).write_text(errors.getvalue())
        (out / "parts" / part_name(shard, record["fingerprint"])).write_text(parts.getvalue())
    for rank in range(RANKS):
        summary = {
            "rank": rank,
            "world_size": RANKS,
            "images": rows // RANKS,
            "seconds": 600.0,
            "device": "cuda",
        }
        (out / "summary" / f"rank-{rank}.json").write_text(json.dumps(summary))


_AGGREGATE = """
import sys
from components.aggregate.aggregate import aggregate
out, artifacts = sys.argv[1], sys.argv[2]
report = aggregate(out, csv_path=artifacts + "/results.csv", parquet_path=artifacts + "/results.parquet",
                   errors_path=artifacts + "/errors.csv", html_path=artifacts + "/report.html")
assert report.complete and report.metrics["rows"] + report.metrics["errors"] == report.metrics["images"]
"""


def measure(rows: int, scratch: Path) -> tuple[float, float]:
    """Aggregate a generated prefix of ``rows`` in a child process: (peak RSS in GiB, seconds)."""
    out, artifacts = scratch / f"results-{rows}", scratch / f"artifacts-{rows}"
    artifacts.mkdir(parents=True)
    generate(out, rows)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(scratch))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _AGGREGATE, str(out), str(artifacts)], env=env)
    # wait4 gives this child's own resource usage: ru_maxrss is its peak RSS in KiB.
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"the aggregate of {rows:,} rows failed")
    return usage.ru_maxrss / 2**20, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.aggregate_memory", description=__doc__.splitlines()[0]
    )
    p.add_argument("--rows", type=int, action="append", help="rows (repeatable; default: 1M, 3M, 10M)")
    args = p.parse_args(argv)
    sizes = sorted(args.rows or [1_000_000, 3_000_000, 10_000_000])
    print(
        f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    )
    print(f"{'rows':>12} {'peak RSS GiB':>13} {'seconds':>8}")
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="aggregate-bench-") as tmp:
            peak, seconds = measure(rows, Path(tmp))
        print(f"{rows:>12,} {peak:>13.2f} {seconds:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
