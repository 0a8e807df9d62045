"""The worker's whole configuration: one dataclass, built from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from worker.storage import absolute, is_gcs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# worker.cuda_graph.COMPILE_MODES' keys; kept here so that parsing a config never imports torch.
COMPILE_CHOICES = ("none", "default", "max-autotune")


# The model a pipeline run classifies with unless told otherwise (and the architecture the
# dev-only random-weight models copy).
DEFAULT_MODEL = "google/vit-base-patch16-224"


@dataclass
class WorkerConfig:
    input: str
    output: str
    model: str
    batch_size: int = 64
    shard_size: int = 1024
    device: str = "auto"
    assignment: str = "static"
    decode: str = "auto"
    gpu_jpeg: str = "cuda"
    read_threads: int = 4
    decode_threads: int = 0
    decode_workers: int = 1
    prefetch_batches: int = 8
    queued_blocks: int = 2
    cuda_graph: bool = True
    compile: str = "default"
    list_processes: int = 8
    compose: bool = True
    project: str | None = None
    log_interval: float = 10.0
    incremental: bool = False
    model_cache: str = field(
        default_factory=lambda: os.environ.get(
            "BATCH_INFERENCE_MODEL_CACHE",
            os.path.join(os.path.expanduser("~"), ".cache", "batch-inference", "models"),
        )
    )

    def __post_init__(self) -> None:
        # Plans and result rows carry absolute local paths, whatever the working directory.
        self.input = absolute(self.input)
        self.output = absolute(self.output)
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.queued_blocks < 0:
            raise ValueError("--queued-blocks must be 0 (no limit) or more")
        if self.shard_size < 1:
            raise ValueError("--shard-size must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("--device must be auto, cpu or cuda")
        if self.assignment not in ("static", "dynamic"):
            raise ValueError("--assignment must be static or dynamic")
        if self.decode not in ("auto", "cpu", "gpu"):
            raise ValueError("--decode must be auto, cpu or gpu")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}")
        if self.gpu_jpeg not in ("cuda", "hardware"):
            raise ValueError("--gpu-jpeg must be cuda or hardware")
        if self.incremental and not is_gcs(self.input):
            raise ValueError(
                "--incremental needs a gs:// --input: changes are found by GCS object generation"
            )

    def to_args(self) -> list[str]:
        """The command-line arguments that rebuild this config (used by the launchers)."""
        defaults = WorkerConfig(input=self.input, output=self.output, model=self.model)
        args = ["--input", self.input, "--output", self.output, "--model", self.model]
        for f in dataclasses.fields(self):
            if f.name in ("input", "output", "model", "model_cache"):
                continue
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                args += [flag, str(value)]
        return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker",
        description=(
            "Classify every image under INPUT exactly once and write CSV parts under OUTPUT. "
            "Run it directly for one process, or as `torchrun --nproc_per_node=K -m worker ...` "
            "for K ranks (inside a PyTorchJob torchrun reads the PET_* environment). "
            "A rerun with the same OUTPUT resumes: committed shards are skipped."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--input",
        required=True,
        help="gs://bucket/prefix or a local directory holding the images "
        f"({', '.join(IMAGE_EXTENSIONS)}); other files are ignored",
    )
    p.add_argument(
        "--output",
        required=True,
        help="gs://bucket/prefix or a local directory for run.json, plan.jsonl, parts/, errors/ "
        "and summary/ (and inventory.jsonl with --incremental); nothing is written anywhere else",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a Hugging Face hub id, a local directory, or a gs:// directory holding a "
        "save_pretrained() image-classification model and its preprocessor_config.json",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument(
        "--shard-size",
        type=int,
        default=1024,
        help="images per shard: the unit of assignment, commit and resume",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto picks cuda when a GPU is visible (bf16 + SDPA), else cpu (fp32)",
    )
    p.add_argument(
        "--assignment",
        choices=("static", "dynamic"),
        default="static",
        help="static: shard i goes to rank i mod world (deterministic); dynamic: ranks claim the "
        "next shard from a shared counter, so fast ranks take more (best balance)",
    )
    p.add_argument(
        "--decode",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="gpu: batched JPEG decode + resize on the GPU (Pillow fallback for what it can't read); "
        "cpu: Pillow only; auto: gpu on cuda, cpu otherwise",
    )
    p.add_argument(
        "--gpu-jpeg",
        choices=("cuda", "hardware"),
        default="cuda",
        help="where GPU decode runs: cuda = nvjpeg on CUDA cores (torchvision, any GPU; the fastest "
        "end to end on an H100); hardware = the GPU's JPEG engines (A100/H100/H200, needs the "
        "hardware-jpeg extra: nvidia-nvimgcodec), pixel-identical to Pillow's decode",
    )
    p.add_argument(
        "--read-threads", type=int, default=4, help="background threads reading bytes ahead of compute"
    )
    p.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="threads for Pillow decode (0: one per CPU core available to this rank)",
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=1,
        help="batches decoded concurrently on GPU runs, each thread on its own high-priority CUDA stream "
        "(torchvision's nvjpeg decoder serializes its calls, and on an H100 a second worker cost "
        "throughput in GIL contention)",
    )
    p.add_argument(
        "--queued-blocks",
        type=int,
        default=2,
        help="on GPU, the most model blocks (encoder layers) queued ahead of the host, so the JPEG "
        "decoder's kernels never wait behind a whole forward; 0: no limit",
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on GPU, replay the forward as one CUDA graph (checked against the eager forward's logits "
        "and speed at start-up; the eager forward where it fails either); --queued-blocks then "
        "does not apply",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="default",
        help="with --cuda-graph, first compile the forward with torch.compile (fused kernels; ~13 s "
        "at start-up on an H100 for ViT-B/16, max-autotune ~140 s for ~3 %% more); the compiled "
        "graph is used only where it gives the eager forward's labels and is the faster graph",
    )
    p.add_argument("--prefetch-batches", type=int, default=8, help="batches read ahead of the GPU")
    p.add_argument(
        "--list-processes",
        type=int,
        default=8,
        help="processes that list the input (DataFlux on GCS; folders split between them on local disk)",
    )
    p.add_argument(
        "--compose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use DataFlux composed downloads on GCS (temporary composites under "
        "dataflux-composed-objects/ in the input bucket, deleted after use); "
        "--no-compose reads objects one by one and never writes to the input bucket",
    )
    p.add_argument(
        "--project", default=None, help="GCP project for GCS clients (default: from the environment)"
    )
    p.add_argument("--log-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument(
        "--incremental",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="classify only images that are new or changed (by GCS generation) since the latest "
        "complete run among OUTPUT's sibling folders with the same input and model; the "
        "aggregate carries that run's rows over for the rest (needs a gs:// input)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> WorkerConfig:
    ns = build_parser().parse_args(argv)
    return WorkerConfig(**vars(ns))
