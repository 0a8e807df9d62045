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

from benchmarks.classifier import make_dataset
from pipelines.dev.random_model import make_model

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"


def make_unique(root: Path, unique: int) -> list[Path]:
    source = root / "unique"
    if len(list(source.rglob("*.jpg"))) != unique:
        shutil.rmtree(source, ignore_errors=True)
        make_dataset(source, unique)
    return sorted(source.rglob("*.jpg"))


def link_copies(files: list[Path], folder: Path, copies: range) -> None:
    for c in copies:
        target = folder / f"copy{c:04d}"
        target.mkdir(parents=True)
        for f in files:
            os.link(f, target / f"{f.parent.name}_{f.name}")


def build_inputs(
    root: Path, files: list[Path], counts: list[int], copies: int, copies_per_gpu: int
) -> dict[int, Path]:
    """The input folder of each GPU count.

    Fixed size (``copies_per_gpu`` 0): one folder of ``copies`` copies for every count.
    Per GPU: ``copies_per_gpu`` copies per GPU, so every run lasts about as long and its
    start-up share stays small. The folders nest (images/gpus8/gpus4/...), so the larger
    runs reuse the smaller runs' links instead of making their own.
    """
    data = root / "images"
    shutil.rmtree(data, ignore_errors=True)
    if not copies_per_gpu:
        link_copies(files, data, range(copies))
        return {n: data for n in counts}
    inputs, parent = {}, data
    for n in sorted(counts, reverse=True):
        inputs[n] = parent = parent / f"gpus{n}"
    done = 0
    for n in sorted(counts):
        link_copies(files, inputs[n], range(done, n * copies_per_gpu))
        done = n * copies_per_gpu
    return inputs


def run(nproc: int, data: Path, out: Path, model: Path, batch: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "-m",
        "worker",
        "--input",
        str(data),
        "--output",
        str(out),
        "--model",
        str(model),
        "--batch-size",
        str(batch),
        "--assignment",
        "dynamic",
        "--log-interval",
        "30",
        *extra,
    ]
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
    return {
        "gpus": nproc,
        "images": images,
        "rows": len(seen),
        "duplicates": duplicates,
        "wall": wall,
        "steady": images / slowest,
        "end_to_end": images / wall,
        # Everything that is not processing images: torchrun, imports, process group,
        # model load, warm-up, planning, and the exit after the last shard.
        "startup_share": (wall - slowest) / wall,
        "balance": min(r["seconds"] for r in ranks) / slowest,
        "per_rank_images": [r["images"] for r in ranks],
        "setup_done_at": [r.get("setup_done_at") for r in ranks],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/scaling")
    p.add_argument("--unique", type=int, default=32768)
    p.add_argument("--copies", type=int, default=16)
    p.add_argument(
        "--copies-per-gpu",
        type=int,
        default=0,
        help="give each run this many copies per GPU instead of --copies for all",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--gpus", default="", help="comma-separated GPU counts (default: 1 and all)")
    p.add_argument("--json", default=None)
    p.add_argument("worker_args", nargs="*", help="more `python -m worker` flags, after --")
    args = p.parse_args()
    work = Path(args.workdir)
    counts = [int(g) for g in args.gpus.split(",")] if args.gpus else sorted({1, torch.cuda.device_count()})
    files = make_unique(work, args.unique)
    inputs = build_inputs(work, files, counts, args.copies, args.copies_per_gpu)
    model = work / "vit-base-patch16-224-random"
    if not (model / "config.json").exists():
        make_model(model)
    results = []
    for n in counts:
        results.append(run(n, inputs[n], work / f"out-{n}", model, args.batch_size, args.worker_args))
        print(json.dumps(results[-1]), flush=True)  # each run's figures, even if a later run fails
    base = results[0]["steady"] / results[0]["gpus"]
    per_run = f"{args.copies_per_gpu} copies per GPU" if args.copies_per_gpu else f"{args.copies} copies"
    print(f"\n{args.unique:,} unique JPEGs, {per_run}, {device_name()}\n")
    print(
        "| GPUs | images | img/s (slowest rank) | img/s (wall) | efficiency | efficiency (wall) | start-up share "
        "| slowest/fastest rank | every image exactly once |\n|---|---|---|---|---|---|---|---|---|"
    )
    wall_base = results[0]["end_to_end"] / results[0]["gpus"]
    for r in results:
        expected = len(files) * (r["gpus"] * args.copies_per_gpu if args.copies_per_gpu else args.copies)
        once = "yes" if r["rows"] == expected and r["duplicates"] == 0 and r["images"] == expected else "NO"
        r["efficiency"] = r["steady"] / (r["gpus"] * base)
        r["wall_efficiency"] = r["end_to_end"] / (r["gpus"] * wall_base)
        print(
            f"| {r['gpus']} | {r['images']:,} | {r['steady']:,.0f} | {r['end_to_end']:,.0f} "
            f"| {100 * r['efficiency']:.1f} % | {100 * r['wall_efficiency']:.1f} % "
            f"| {100 * r['startup_share']:.1f} % | {100 * r['balance']:.1f} % | {once} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
