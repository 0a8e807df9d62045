"""Tasks benchmark: ``python -m benchmarks.tasks`` on a GPU machine (``--small`` anywhere, CPU included).

It builds a random-weight CLIP of ViT-B/16's size locally (``pipelines.dev.random_models``: 224 px,
12 x 768 vision, 12 x 512 text, 512-d projection; no hub), generates COCO-like JPEGs
(640x480), and for ``--task embedding`` and ``--task zero-shot`` with ``--labels`` labels
(1,000 by default) measures, on one GPU:

- end to end: the real worker (read files -> GPU decode -> forward as the worker's CUDA graph,
  compiled by default -> commit CSV parts), images per second, and that every image has exactly
  one row;
- model only: the same task object's forward as the worker runs it (``warm_up``'s CUDA graph), on
  device tensors at the same batch size; the ratio end to end / model only (goal >= 0.9), and the
  GPU's busy share the worker itself reports for the run;
- bf16 against fp32 on the same pixels (Pillow's, of the first ``--compare-images``): the task
  as the worker loads it on the GPU (bf16) against the same task in float32; for embeddings the
  median and least cosine (goal: median >= 0.999), for zero-shot the share of equal top-1 labels
  (goal >= 99.5 %) and of labels whose fp32 logit is within 0.01 of the fp32 best (near ties).

Weights are random: a random CLIP's similarities to 1,000 labels are close together, so the
label agreement measures bf16 at its hardest. ``--json FILE`` also writes every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.classifier import bench_images

log = logging.getLogger("benchmarks.tasks")

TASKS = ("embedding", "zero-shot")


def task_config(task: str, data: Path, out: Path, model: Path, device: str, batch: int, labels: list[str]):
    from worker.config import WorkerConfig

    settings = {"labels": json.dumps(labels)} if task == "zero-shot" else {}
    return WorkerConfig(
        input=str(data),
        output=str(out),
        model=str(model),
        task=task,
        device=device,
        batch_size=batch,
        shard_size=4 * batch,
        prefetch_batches=6,
        log_interval=5.0,
        **settings,
    )


def end_to_end(cfg) -> dict:
    from worker.run import run

    shutil.rmtree(cfg.output, ignore_errors=True)
    return run(cfg)


def rows_once(out: Path, expected: int) -> str:
    """ "yes" where the parts hold exactly one row per image."""
    uris = [
        row["uri"]
        for part in sorted((Path(out) / "parts").glob("*.csv"))
        for row in csv.DictReader(part.open())
    ]
    return (
        "yes"
        if len(uris) == len(set(uris)) == expected
        else f"NO ({len(uris)} rows, {len(set(uris))} images)"
    )


def model_only(task, device: torch.device, batch: int, iters: int, compile_mode: str) -> float:
    """Images per second of the task's forward as the worker runs it, on device tensors."""
    from worker.infer import warm_up

    shape = (batch, 3, *task.preprocess.output_hw)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graph = warm_up(task, shape, device, True, compile_mode) if device.type == "cuda" else None
    forward = graph if graph is not None else task.forward
    inputs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)]
    with torch.inference_mode():
        for x in inputs:
            forward(x)
        _sync(device)
        start = time.perf_counter()
        for i in range(iters):
            forward(inputs[i % 3])
        _sync(device)
    return batch * iters / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def float32_task(cls, model: Path, device: torch.device, cfg):
    """The task in float32 on ``device``: loaded as on a CPU (fp32, its text side too), then moved."""
    task = cls(str(model), torch.device("cpu"), cfg)
    task.model.to(device)
    for name, value in vars(task).items():
        if isinstance(value, torch.Tensor):
            setattr(task, name, value.to(device))
    return task


def compare_precisions(task, reference, pixels: torch.Tensor, device: torch.device, batch: int) -> dict:
    """bf16 (the task as the worker runs it) against fp32 on the same float32 pixels."""
    low, high = [], []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            chunk = pixels[start : start + batch].to(device)
            if hasattr(reference, "logits"):  # zero-shot: the fp32 logits judge near ties
                low.append(task.forward(chunk.to(dtype))[1][:, 0].cpu())
                high.append(reference.logits(chunk).float().cpu())
            else:
                low.append(task.forward(chunk.to(dtype))[0].float().cpu())
                high.append(reference.forward(chunk)[0].float().cpu())
    low, high = torch.cat(low), torch.cat(high)
    if low.dim() == 1:  # top-1 labels against fp32 logits
        best = high.argmax(-1)
        chosen = high.gather(-1, low.view(-1, 1)).squeeze(-1)
        return {
            "labels_equal": (low == best).float().mean().item(),
            "labels_within_0.01_logit": (chosen >= high.max(-1).values - 0.01).float().mean().item(),
            "median_top1_top2_logit_gap": (high.topk(2).values[:, 0] - high.topk(2).values[:, 1])
            .median()
            .item(),
        }
    cosines = torch.nn.functional.cosine_similarity(low, high, dim=-1)
    return {"median_cosine": cosines.median().item(), "least_cosine": cosines.min().item()}


def reference_pixels(paths: list[Path], model: Path) -> torch.Tensor:
    """Pillow's float32 pixels of the images, the processor's arithmetic (the CPU decoder's)."""
    from worker.decode.cpu import CpuDecoder
    from worker.decode.spec import load_preprocess

    with ThreadPoolExecutor(8) as pool:
        decoded = CpuDecoder(load_preprocess(str(model)), pool)([p.read_bytes() for p in paths])
    return decoded.pixels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="a tiny CLIP, few images and labels: checks the benchmark on a CPU",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--images", type=int, default=None, help="JPEGs to generate (default: 32768, 96 with --small)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 256, 16 with --small")
    p.add_argument(
        "--labels", type=int, default=None, help="zero-shot labels (default: 1000, 50 with --small)"
    )
    p.add_argument("--compare-images", type=int, default=1024, help="images for bf16 against fp32")
    p.add_argument("--model-iters", type=int, default=30)
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="end-to-end runs per task; the mean is the headline (single runs spread by +-5 %% on an H100)",
    )
    p.add_argument("--compile", choices=("none", "default", "max-autotune"), default="default")
    p.add_argument("--workdir", default=None, help="images, model and outputs (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.dev.random_models import make_clip
    from worker.tasks import task_class

    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    n_images = args.images or (96 if args.small else 32768)
    batch = args.batch_size or (16 if args.small else 256)
    labels = [f"class {i}" for i in range(args.labels or (50 if args.small else 1000))]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tasks-bench-"))
    paths = bench_images(work / "images", n_images)
    model = work / ("clip-tiny" if args.small else "clip-vit-base-patch16-random")
    if not (model / "config.json").exists():
        make_clip(model, tiny=args.small)
    pixels = reference_pixels(paths[: args.compare_images], model)

    figures: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "tiny CLIP" if args.small else "CLIP ViT-B/16-sized, random weights",
        "images": len(paths),
        "batch_size": batch,
        "labels": len(labels),
    }
    configs = {
        name: task_config(name, work / "images", work / f"out-{name}", model, device.type, batch, labels)
        for name in TASKS
    }
    # Every run reads the images from the page cache (the first task's first run would read the
    # disk otherwise), and the tasks take turns, so neither gets the machine's first minutes alone.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(Path.read_bytes, paths))
    runs: dict[str, list[dict]] = {name: [] for name in TASKS}
    for _ in range(args.repeats):
        for name in TASKS:
            runs[name].append(end_to_end(configs[name]))
    for name in TASKS:
        cfg, summaries = configs[name], runs[name]
        mean = sum(s["images_per_second"] for s in summaries) / len(summaries)
        cls = task_class(name)
        task = cls(str(model), device, cfg)
        rate = model_only(task, device, batch, args.model_iters, args.compile)
        figures[name] = {
            "end_to_end": mean,
            "end_to_end_runs": [s["images_per_second"] for s in summaries],
            "model_only": rate,
            "ratio": mean / rate,
            "gpu_busy": sum(s.get("gpu_busy") or 0.0 for s in summaries) / len(summaries),
            "exactly_once": rows_once(work / f"out-{name}", len(paths)),
            **compare_precisions(task, float32_task(cls, model, device, cfg), pixels, device, batch),
        }
        del task
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = [
        ("device", figures["device"], ""),
        ("model", figures["model"], f"batch {batch}, {len(paths)} JPEGs 640x480"),
    ]
    for name in TASKS:
        f = figures[name]
        what = f"{name}" + (f", {len(labels)} labels" if name == "zero-shot" else "")
        rows += [
            (
                f"{what}: end to end, img/s",
                f"{f['end_to_end']:,.0f}",
                f"mean of {' / '.join(f'{r:,.0f}' for r in f['end_to_end_runs'])}; every image once: "
                f"{f['exactly_once']}",
            ),
            (
                f"{what}: model only, img/s",
                f"{f['model_only']:,.0f}",
                "the worker's forward (CUDA graph on GPU)",
            ),
            (
                f"{what}: end to end / model only",
                f"{f['ratio']:.3f}",
                "goal >= 0.9"
                + (f"; GPU busy {100 * f['gpu_busy']:.0f} % of the run" if device.type == "cuda" else ""),
            ),
        ]
        if "median_cosine" in f:
            rows.append(
                (
                    f"{what}: bf16 vs fp32 cosine, median",
                    f"{f['median_cosine']:.5f}",
                    f"least {f['least_cosine']:.5f}; goal >= 0.999",
                )
            )
        else:
            rows.append(
                (
                    f"{what}: bf16 vs fp32 equal labels",
                    f"{100 * f['labels_equal']:.2f} %",
                    f"{100 * f['labels_within_0.01_logit']:.2f} % within 0.01 logit of the fp32 best; median "
                    f"top-2 gap {f['median_top1_top2_logit_gap']:.3f}; goal >= 99.5 %",
                )
            )
    width = max(len(r[0]) for r in rows)
    print("\n| what | figure | note |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if all(figures[name]["exactly_once"] == "yes" for name in TASKS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
