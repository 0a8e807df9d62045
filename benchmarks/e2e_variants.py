"""End-to-end worker throughput under several settings, one process, one GPU.

``PYTHONPATH=. python benchmarks/e2e_variants.py --workdir /tmp/bench``; figures go to benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

import worker.infer
import worker.run
from benchmarks.classifier import bench_images, trained_model
from worker.config import WorkerConfig
from worker.decode.gpu import GpuDecoder
from worker.decode.jpeg import CudaJpeg, HardwareJpeg
from worker.run import run
from worker.storage.local import LocalStorage

# Each variant changes the worker's defaults (nvjpeg, the compiled forward as a CUDA graph, Pillow-exact Triton
# resize, model on its own stream); keys starting with "_" are settings outside WorkerConfig.
# The pacing variants (queued_blocks) apply to the eager forward only.
VARIANTS = {
    "default": {},
    "graph not compiled": {"compile": "none"},
    "graph compiled with max-autotune": {"compile": "max-autotune"},
    "eager forward, 2 blocks queued": {"cuda_graph": False},
    "eager forward, unpaced": {"cuda_graph": False, "queued_blocks": 0},
    "eager forward, 4 blocks queued": {"cuda_graph": False, "queued_blocks": 4},
    "torch resize": {"_torch_resize": True},
    "model on the legacy default stream": {"_legacy_stream": True},
    "2 decode workers": {"decode_workers": 2},
    "3 decode workers": {"decode_workers": 3},
    "2 read threads": {"read_threads": 2},
    "8 read threads": {"read_threads": 8},
    "batch 512": {"batch_size": 512},
    "GIL switch interval 1 ms": {"_switch": 0.001},
    "GIL switch interval 0.2 ms": {"_switch": 0.0002},
    "3 batches decoded ahead": {"_lookahead": 3},
    "5 batches decoded ahead": {"_lookahead": 5},
    "2 decode workers, 3 batches decoded ahead": {"decode_workers": 2, "_lookahead": 3},
    "2 forwards in flight": {"_in_flight": 2},
    "3 decoded ahead, 2 forwards in flight": {"_lookahead": 3, "_in_flight": 2},
    "hardware jpeg": {"gpu_jpeg": "hardware"},
    "hardware jpeg, model on the legacy default stream": {"gpu_jpeg": "hardware", "_legacy_stream": True},
    "hardware jpeg, 2 decode workers": {"gpu_jpeg": "hardware", "decode_workers": 2},
    "hardware jpeg, 4 decode workers": {"gpu_jpeg": "hardware", "decode_workers": 4},
}


class CallTimes:
    """Host seconds spent in chosen functions, per call, across threads: where a batch's time goes."""

    def __init__(self, targets: dict[str, tuple[type, str]]):
        self.targets = targets
        self.totals: dict[str, list[float]] = collections.defaultdict(list)
        self.lock = threading.Lock()

    def _wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.totals[label].append(time.perf_counter() - start)

        return timed

    @contextlib.contextmanager
    def installed(self):
        originals = {label: getattr(cls, name) for label, (cls, name) in self.targets.items()}
        for label, (cls, name) in self.targets.items():
            setattr(cls, name, self._wrap(label, originals[label]))
        try:
            yield self
        finally:
            for label, (cls, name) in self.targets.items():
                setattr(cls, name, originals[label])

    def line(self) -> str:
        """Mean ms per call, and the means of the first 10 calls and of the second half (warm-up shows)."""

        def ms(t: list[float]) -> str:
            return f"{1e3 * sum(t) / len(t):.1f}" if t else "-"

        return ", ".join(
            f"{label} {ms(t)} ms x {len(t)} (first 10: {ms(t[:10])}, second half: {ms(t[len(t) // 2 :])})"
            for label, t in self.totals.items()
            if t
        )


CALLS = {
    "read a batch": (LocalStorage, "read_many"),
    "decode a batch": (GpuDecoder, "__call__"),
    "nvjpeg call": (CudaJpeg, "decode"),
    "nvImageCodec call": (HardwareJpeg, "decode"),
}


def set_queue_depths(lookahead: int, in_flight: int) -> None:
    """The worker's decode look-ahead and batches in flight, in every module that reads them."""
    for module in (worker.infer, worker.run):
        module.DECODE_LOOKAHEAD, module.GPU_BATCHES_IN_FLIGHT = lookahead, in_flight


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--images", type=int, default=16384)
    p.add_argument(
        "--only",
        default="",
        help="variant names, separated by semicolons, run in that order "
        "(repeat names to interleave A/B runs)",
    )
    p.add_argument(
        "--warm-up",
        type=int,
        default=1,
        help="unreported default runs first: a process's first run was slower on an H100, its first "
        "nvjpeg calls above all (benchmarks/NOTES.md)",
    )
    args = p.parse_args()
    work = Path(args.workdir)
    paths = bench_images(work / "images", args.images)
    model_dir, _ = trained_model(work, paths, torch.device("cuda"), epochs=3)
    default_switch = sys.getswitchinterval()
    names = args.only.split(";") if args.only else list(VARIANTS)
    for i, name in enumerate(["default"] * args.warm_up + names):
        overrides = dict(VARIANTS[name])
        sys.setswitchinterval(overrides.pop("_switch", default_switch))
        own_stream = worker.run.model_stream
        triton_resize = GpuDecoder._pillow_resize
        if overrides.pop("_torch_resize", False):
            GpuDecoder._pillow_resize = lambda self, pre, device: None
        lookahead, in_flight = worker.infer.DECODE_LOOKAHEAD, worker.infer.GPU_BATCHES_IN_FLIGHT
        set_queue_depths(overrides.pop("_lookahead", lookahead), overrides.pop("_in_flight", in_flight))
        if overrides.pop("_legacy_stream", False):
            worker.run.model_stream = lambda device: contextlib.nullcontext()
        out = work / "out-variant"
        shutil.rmtree(out, ignore_errors=True)
        cfg = WorkerConfig(
            input=str(work / "images"),
            output=str(out),
            model=str(model_dir),
            device="cuda",
            batch_size=overrides.pop("batch_size", 256),
            shard_size=1024,
            log_interval=60,
            **overrides,
        )
        times = CallTimes(CALLS)
        try:
            with times.installed():
                summary = run(cfg)
        finally:
            set_queue_depths(lookahead, in_flight)
            worker.run.model_stream = own_stream
            GpuDecoder._pillow_resize = triton_resize
        label = "(warm-up) " + name if i < args.warm_up else name
        print(
            f"{label:40s} {summary['images_per_second']:>9,.0f} img/s, GPU busy {100 * summary['gpu_busy']:.0f} %, "
            f"waiting for input {100 * summary['input_wait']:.0f} %; {times.line()}",
            flush=True,
        )
    sys.setswitchinterval(default_switch)


if __name__ == "__main__":
    main()
