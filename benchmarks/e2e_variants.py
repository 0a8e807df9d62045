"""End-to-end worker throughput under several settings, one process, one GPU.

``PYTHONPATH=. python benchmarks/e2e_variants.py --workdir /tmp/bench``; figures go to benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from worker.bench import align_head_with_features, make_dataset
from worker.random_model import make_model
from worker.config import WorkerConfig
from worker.run import run

VARIANTS = {
    "default": {},
    "1 decode worker": {"decode_workers": 1},
    "4 decode workers": {"decode_workers": 4},
    "switch interval 0.5 ms": {"_switch": 0.0005},
    "batch 512": {"batch_size": 512},
    "read threads 4": {"_read_threads": 4},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--only", default="")
    args = p.parse_args()
    work = Path(args.workdir)
    paths = sorted((work / "images").rglob("*.jpg"))
    if len(paths) < args.images:
        paths = make_dataset(work / "images", args.images)
    model_dir = work / "vit-base-patch16-224-random"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
        (model_dir / "head.json").write_text(json.dumps(align_head_with_features(model_dir, paths, "cuda")))
    results = {}
    default_switch = sys.getswitchinterval()
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        overrides = dict(overrides)
        sys.setswitchinterval(overrides.pop("_switch", default_switch))
        read_threads = overrides.pop("_read_threads", 16)
        out = work / "out-variant"
        shutil.rmtree(out, ignore_errors=True)
        cfg = WorkerConfig(input=str(work / "images"), output=str(out), model=str(model_dir), device="cuda",
                           batch_size=overrides.pop("batch_size", 256), shard_size=1024, read_threads=read_threads,
                           log_interval=60, **overrides)
        results[name] = run(cfg)["images_per_second"]
        print(f"{name:28s} {results[name]:>9,.0f} img/s", flush=True)
    sys.setswitchinterval(default_switch)


if __name__ == "__main__":
    main()
