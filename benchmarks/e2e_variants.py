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

VARIANTS = {
    "nvjpeg, Pillow-exact Triton resize": {"queued_blocks": 0},
    "nvjpeg, torch resize": {"queued_blocks": 0, "_torch_resize": True},
    "nvjpeg, Triton resize, 2 blocks queued": {},
    "nvjpeg, torch resize, 2 blocks queued": {"_torch_resize": True},
    "eager unpaced": {"queued_blocks": 0},
    "eager unpaced, 1 decode worker": {"queued_blocks": 0, "decode_workers": 1},
    "eager unpaced, 3 decode workers": {"queued_blocks": 0, "decode_workers": 3},
    "eager unpaced, 2 read threads": {"queued_blocks": 0, "read_threads": 2},
    "eager unpaced, 8 read threads": {"queued_blocks": 0, "read_threads": 8},
    "eager unpaced, switch 1 ms": {"queued_blocks": 0, "_switch": 0.001},
    "eager unpaced, batch 512": {"queued_blocks": 0, "batch_size": 512},
    "eager, 4 blocks queued": {"queued_blocks": 4},
    "cuda jpeg, eager, 2 blocks queued": {},
    "cuda jpeg, eager, unpaced": {"queued_blocks": 0},
    "cuda jpeg, model on the legacy default stream": {"_legacy_stream": True},
    "cuda jpeg, model on its own stream": {},
    "hardware jpeg, model on the legacy default stream": {"gpu_jpeg": "hardware", "_legacy_stream": True},
    "hardware jpeg, model on its own stream": {"gpu_jpeg": "hardware"},
    "cuda, own stream, unpaced": {"queued_blocks": 0},
    "cuda, switch 1 ms": {"_switch": 0.001},
    "cuda, switch 0.2 ms": {"_switch": 0.0002},
    "cuda, 2 read threads": {"read_threads": 2},
    "hardware, own stream, unpaced": {"gpu_jpeg": "hardware", "queued_blocks": 0},
    "hardware, own stream, 4 decode workers": {"gpu_jpeg": "hardware", "decode_workers": 4},
    "hardware, own stream, 8 read threads": {"gpu_jpeg": "hardware", "read_threads": 8},
    "cuda jpeg, unpaced": {"gpu_jpeg": "cuda", "queued_blocks": 0},
    "cuda jpeg, 2 blocks queued": {"gpu_jpeg": "cuda", "queued_blocks": 2},
    "hardware jpeg, unpaced": {"gpu_jpeg": "hardware", "queued_blocks": 0},
    "hardware jpeg, 2 blocks queued": {"gpu_jpeg": "hardware", "queued_blocks": 2},
    "hardware jpeg, 1 block queued": {"gpu_jpeg": "hardware", "queued_blocks": 1},
    "hardware jpeg, 4 blocks queued": {"gpu_jpeg": "hardware", "queued_blocks": 4},
    "hardware, 2 queued, switch 0.5 ms": {"gpu_jpeg": "hardware", "_switch": 0.0005},
    "hardware, 2 queued, 1 decode worker": {"gpu_jpeg": "hardware", "decode_workers": 1},
    "hardware, 2 queued, 4 decode workers": {"gpu_jpeg": "hardware", "decode_workers": 4},
    "cuda, 2 queued, switch 0.5 ms": {"gpu_jpeg": "cuda", "_switch": 0.0005},
    "cuda, 1 block queued": {"queued_blocks": 1},
    "cuda, 3 blocks queued": {"queued_blocks": 3},
    "cuda, 2 queued, 1 decode worker": {"decode_workers": 1},
    "cuda, 2 queued, 3 decode workers": {"decode_workers": 3},
    "cuda, 2 queued, batch 512": {"batch_size": 512},
    "cuda, 2 queued, 8 read threads": {"read_threads": 8},
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
