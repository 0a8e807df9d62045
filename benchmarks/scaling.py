"""Multi-GPU scaling on one host (issue 7): the worker under torchrun on 1 GPU, then on all of them.

``python benchmarks/scaling.py --workdir /tmp/scaling --unique 32768 --copies 16`` generates
``unique`` JPEGs and hard-links them ``copies`` times (distinct paths, same bytes: a large
dataset without the generation time), then runs ``torchrun --nproc_per_node=N -m worker`` with
dynamic shard assignment for N = 1 and N = every GPU, and prints one table: img/s (images /
slowest rank's processing seconds, and images / torchrun's wall time), scaling efficiency,
start-up share, rank balance, and the exactly-once check over the parts.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 ...), as the machines' owners require.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from worker.bench import make_dataset
from worker.random_model import make_model

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def build_dataset(root: Path, unique: int, copies: int) -> int:
    source = root / "unique"
    if len(list(source.rglob("*.jpg"))) != unique:
        shutil.rmtree(source, ignore_errors=True)
        make_dataset(source, unique)
    files = sorted(source.rglob("*.jpg"))
    data = root / "images"
    shutil.rmtree(data, ignore_errors=True)
    for c in range(copies):
        folder = data / f"copy{c:03d}"
        folder.mkdir(parents=True)
        for f in files:
            os.link(f, folder / f"{f.parent.name}_{f.name}")
    return unique * copies


def run(nproc: int, data: Path, out: Path, model: Path, batch: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "worker",
           "--input", str(data), "--output", str(out), "--model", str(model), "--batch-size", str(batch),
           "--assignment", "dynamic", "--log-interval", "30", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **NO_MULTICAST})
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted((out / "summary").glob("rank-*.json"))]
    images = sum(r["images"] for r in ranks)
    seen: set[str] = set()
    duplicates = 0
    for part in (out / "parts").glob("*.csv"):
        with part.open() as fh:
            for row in csv.DictReader(fh):
                duplicates += row["uri"] in seen
                seen.add(row["uri"])
    slowest = max(r["seconds"] for r in ranks)
    return {"gpus": nproc, "images": images, "rows": len(seen), "duplicates": duplicates, "wall": wall,
            "steady": images / slowest, "end_to_end": images / wall,
            "startup_share": max(r["setup_seconds"] for r in ranks) / wall,
            "balance": min(r["seconds"] for r in ranks) / slowest,
            "per_rank_images": [r["images"] for r in ranks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/scaling")
    p.add_argument("--unique", type=int, default=32768)
    p.add_argument("--copies", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--gpus", default="", help="comma-separated GPU counts (default: 1 and all)")
    p.add_argument("--json", default=None)
    p.add_argument("worker_args", nargs="*", help="more `python -m worker` flags, after --")
    args = p.parse_args()
    work = Path(args.workdir)
    total = build_dataset(work, args.unique, args.copies)
    model = work / "vit-base-patch16-224-random"
    if not (model / "config.json").exists():
        make_model(model)
    counts = [int(g) for g in args.gpus.split(",")] if args.gpus else sorted({1, torch.cuda.device_count()})
    results = [run(n, work / "images", work / f"out-{n}", model, args.batch_size, args.worker_args) for n in counts]
    base = results[0]["steady"] / results[0]["gpus"]
    print(f"\n{total:,} images ({args.unique:,} unique JPEGs x {args.copies}), {torch.cuda.get_device_name(0)}\n")
    print("| GPUs | img/s (slowest rank) | img/s (wall, with start-up) | efficiency | start-up share "
          "| slowest/fastest rank | every image exactly once |\n|---|---|---|---|---|---|---|")
    for r in results:
        once = "yes" if r["rows"] == total and r["duplicates"] == 0 and r["images"] == total else "NO"
        r["efficiency"] = r["steady"] / (r["gpus"] * base)
        print(f"| {r['gpus']} | {r['steady']:,.0f} | {r['end_to_end']:,.0f} | {100 * r['efficiency']:.1f} % "
              f"| {100 * r['startup_share']:.1f} % | {100 * r['balance']:.1f} % | {once} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
