"""End-to-end worker throughput under several settings, one process, one GPU.

``PYTHONPATH=. python benchmarks/e2e_variants.py --workdir /tmp/bench``; figures go to benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

from worker.bench import train_probe_head, make_dataset
from worker.random_model import make_model
from worker.config import WorkerConfig
from worker.decode import GpuDecoder
import worker.run
from worker.run import run

# Each variant changes the worker's defaults (nvjpeg, the forward as a CUDA graph, Pillow-exact Triton
# resize, model on its own stream); keys starting with "_" are settings outside WorkerConfig.
# The pacing variants (queued_blocks) apply to the eager forward only.
VARIANTS = {
    "default": {},
    "eager forward, 2 blocks queued": {"cuda_graph": False},
    "eager forward, unpaced": {"cuda_graph": False, "queued_blocks": 0},
    "eager forward, 4 blocks queued": {"cuda_graph": False, "queued_blocks": 4},
    "torch resize": {"_torch_resize": True},
    "model on the legacy default stream": {"_legacy_stream": True},
    "1 decode worker": {"decode_workers": 1},
    "3 decode workers": {"decode_workers": 3},
    "2 read threads": {"read_threads": 2},
    "8 read threads": {"read_threads": 8},
    "batch 512": {"batch_size": 512},
    "GIL switch interval 1 ms": {"_switch": 0.001},
    "GIL switch interval 0.2 ms": {"_switch": 0.0002},
    "hardware jpeg": {"gpu_jpeg": "hardware"},
    "hardware jpeg, model on the legacy default stream": {"gpu_jpeg": "hardware", "_legacy_stream": True},
    "hardware jpeg, 1 decode worker": {"gpu_jpeg": "hardware", "decode_workers": 1},
    "hardware jpeg, 4 decode workers": {"gpu_jpeg": "hardware", "decode_workers": 4},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--only", default="", help="variant names, separated by semicolons")
    args = p.parse_args()
    work = Path(args.workdir)
    paths = sorted((work / "images").rglob("*.jpg"))
    if len(paths) < args.images:
        paths = make_dataset(work / "images", args.images)
    model_dir = work / "vit-base-patch16-224-random-probe-head"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
        (model_dir / "head.json").write_text(json.dumps(train_probe_head(model_dir, paths, "cuda")))
    results = {}
    default_switch = sys.getswitchinterval()
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only.split(";"):
            continue
        overrides = dict(overrides)
        sys.setswitchinterval(overrides.pop("_switch", default_switch))
        own_stream = worker.run.model_stream
        triton_resize = GpuDecoder._pillow_resize
        if overrides.pop("_torch_resize", False):
            GpuDecoder._pillow_resize = lambda self, pre, device: None
        if overrides.pop("_legacy_stream", False):
            worker.run.model_stream = lambda device: contextlib.nullcontext()
        out = work / "out-variant"
        shutil.rmtree(out, ignore_errors=True)
        cfg = WorkerConfig(input=str(work / "images"), output=str(out), model=str(model_dir), device="cuda",
                           batch_size=overrides.pop("batch_size", 256), shard_size=1024,
                           log_interval=60, **overrides)
        try:
            results[name] = run(cfg)["images_per_second"]
        finally:
            worker.run.model_stream = own_stream
            GpuDecoder._pillow_resize = triton_resize
        print(f"{name:28s} {results[name]:>9,.0f} img/s", flush=True)
    sys.setswitchinterval(default_switch)


if __name__ == "__main__":
    main()
