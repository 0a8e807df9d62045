"""Throughput benchmark: ``python -m worker.bench`` on any GPU machine (or ``--device cpu`` anywhere).

It generates COCO-like JPEGs (640x480, ~50-150 KB), builds a random-weight model of
google/vit-base-patch16-224's architecture, trains it as a classifier of the first 8,192
images (``train_classifier``), and prints one table:

- model only (bf16 + SDPA on random device tensors): eager, as a CUDA graph, and compiled by
  torch.compile as a CUDA graph (what the worker replays by default),
- decode only, for each GPU JPEG decoder (+ resize + normalize),
- end to end through the real worker (read files -> decode -> infer -> commit CSV
  parts) with Pillow decode, nvjpeg on CUDA cores, and the hardware JPEG engines
  (where nvImageCodec and the engines are there),
- each end-to-end / model-only ratio, and peak GPU memory.

It then checks correctness at speed, for each run: every image appears exactly once
in the parts, and, on the images the classifier was not trained on, the share of labels
equal to float32 references: the model in fp32 on Pillow's pixels (with the image
processor's arithmetic), and in fp32 on the same GPU decoder's pixels (bf16 alone).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipelines.dev.random_model import make_model

log = logging.getLogger("worker.bench")


def _make_jpeg(args: tuple[int, Path]) -> int:
    from worker.decode import photo_like_jpeg

    seed, path = args
    h, w = (480, 640) if seed % 4 else (640, 480)  # COCO has both orientations
    data = photo_like_jpeg(h, w, seed, quality=int(np.random.default_rng(seed).integers(70, 93)))
    path.write_bytes(data)
    return len(data)


def make_dataset(root: Path, n: int) -> list[Path]:
    paths = [root / f"{i // 1000:03d}" / f"img_{i:06d}.jpg" for i in range(n)]
    for d in {p.parent for p in paths}:
        d.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        sizes = list(pool.map(_make_jpeg, [(i, p) for i, p in enumerate(paths)], chunksize=64))
    log.info(
        "generated %d JPEGs, %.0f KB mean (%.0f-%.0f KB)",
        n,
        np.mean(sizes) / 1e3,
        min(sizes) / 1e3,
        max(sizes) / 1e3,
    )
    return paths


def bench_images(root: Path, n: int) -> list[Path]:
    """The ``n`` generated JPEGs under ``root``: reused where exactly ``n`` are there, else made anew."""
    paths = sorted(root.rglob("*.jpg")) if root.is_dir() else []
    if len(paths) != n:
        shutil.rmtree(root, ignore_errors=True)
        paths = make_dataset(root, n)
    return paths


def trained_model(work: Path, paths: list[Path], device: torch.device, epochs: int) -> tuple[Path, dict]:
    """The benchmark's classifier under ``work`` (made by ``train_classifier`` unless already
    there) and what its training reported.
    """
    model_dir = work / f"vit-base-patch16-224-random-fine-tuned-{epochs}"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
        (model_dir / "head.json").write_text(json.dumps(train_classifier(model_dir, paths, device, epochs)))
    return model_dir, json.loads((model_dir / "head.json").read_text())


TRAIN_IMAGES = 8192  # the first images train the classifier; agreement is measured on the rest


def train_classifier(
    model_dir: Path,
    paths: list[Path],
    device: torch.device,
    epochs: int,
    clusters: int = 100,
    probe_steps: int = 300,
) -> dict:
    """Turn the random-weight model into a trained classifier of these images, in place.

    Agreement between bf16 and fp32 labels is a property of a trained classifier's decision
    margins; a random ViT has none (its own head gives near-tie logits, median top-1
    probability ~0.005 over 1000 classes, so any rounding flips the argmax). So:

    1. the classes are ``clusters`` k-means clusters of the random backbone's fp32 features
       of the first ``TRAIN_IMAGES`` images (Pillow pixels), spread over the 1000 labels;
    2. a linear-probe head is fitted to them (Adam, fp32), temperature-scaled to a median
       top-1 probability of 0.8 (scaling changes no label);
    3. the whole network is fine-tuned on them for ``epochs`` epochs (AdamW, bf16 autocast),
       as a user's model is trained on its task. 0 keeps the random backbone.

    The architecture and dtype are unchanged, so every timing is too. Images past the first
    ``TRAIN_IMAGES`` are never seen in training: the agreement figures use only those.
    """
    from transformers import AutoModelForImageClassification

    from worker.decode import CpuDecoder, Preprocess
    from worker.model import load_preprocessor_config

    pre = Preprocess.from_config(load_preprocessor_config(str(model_dir)))
    model = (
        AutoModelForImageClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)
    )
    with ThreadPoolExecutor(os.cpu_count()) as pool, torch.no_grad():
        decoder = CpuDecoder(pre, pool)
        pixels = torch.cat(
            [
                decoder([p.read_bytes() for p in paths[i : i + 256]]).pixels.to(device)
                for i in range(0, min(TRAIN_IMAGES, len(paths)), 256)
            ]
        )
        feats = torch.cat(
            [
                model.vit(pixel_values=pixels[i : i + 256]).last_hidden_state[:, 0]
                for i in range(0, len(pixels), 256)
            ]
        )
    gen = torch.Generator(device="cpu").manual_seed(0)
    targets = _kmeans_classes(feats, clusters, model.config.num_labels, gen)
    _fit_probe(model.classifier, feats, targets, probe_steps)
    if epochs:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
        for epoch in range(epochs):
            for idx in torch.randperm(len(pixels), generator=gen).split(64):
                idx = idx.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(pixel_values=pixels[idx]).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), targets[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            log.info("fine-tuning: epoch %d of %d, loss %.3f", epoch + 1, epochs, loss.item())
        model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(pixel_values=pixels[i : i + 256]).logits for i in range(0, len(pixels), 256)]
        )
        probs = logits.softmax(-1)
        top2 = probs.topk(2, dim=-1).values
        accuracy = (probs.argmax(-1) == targets).float().mean().item()
    model.save_pretrained(model_dir)
    tuned = f"whole network fine-tuned {epochs} epochs" if epochs else "random backbone, linear-probe head"
    return {
        "head": f"{tuned} on {len(pixels):,} images, {clusters} k-means classes",
        "train_images": len(pixels),
        "train_accuracy": accuracy,
        "median_top1_prob": top2[:, 0].median().item(),
        "median_margin": (top2[:, 0] - top2[:, 1]).median().item(),
    }


def _kmeans_classes(
    feats: torch.Tensor, clusters: int, num_labels: int, gen: torch.Generator
) -> torch.Tensor:
    """Pseudo-labels: k-means (cosine, on centred features), each cluster one of ``num_labels``."""
    centred = torch.nn.functional.normalize(feats - feats.mean(0), dim=-1)
    centroids = centred[torch.randperm(len(centred), generator=gen)[:clusters].to(feats.device)]
    for _ in range(30):
        assign = (centred @ centroids.T).argmax(-1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, centred)
        centroids = torch.nn.functional.normalize(
            torch.where(sums.norm(dim=-1, keepdim=True) > 0, sums, centroids), dim=-1
        )
    classes = torch.randperm(num_labels, generator=gen)[:clusters].to(feats.device)
    return classes[(centred @ centroids.T).argmax(-1)]


def _fit_probe(head: torch.nn.Linear, feats: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
    """Fit ``head`` to (feats, targets) in fp32, then temperature-scale it: trained to
    saturation a probe is near-certain, and a median top-1 probability of 0.8 is about a
    trained ImageNet ViT's.
    """
    probe = torch.nn.Linear(feats.shape[1], head.out_features).to(feats.device)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(feats), targets).backward()
        opt.step()
    with torch.no_grad():
        logits = probe(feats)
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (
                (mid, high) if (logits * mid).softmax(-1).max(-1).values.median() < 0.8 else (low, mid)
            )
        head.weight.copy_(probe.weight * high)
        head.bias.copy_(probe.bias * high)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model_only(
    model_dir: Path, device: torch.device, batch: int, iters: int, compile_mode: str = "default"
) -> dict[str, float]:
    """img/s of the worker's forward + top-1 on device tensors: eager, and as each CUDA graph the
    worker can replay (the forward as it is, and compiled by torch.compile).
    """
    from worker.cuda_graph import COMPILE_MODES, GraphedForward
    from worker.model import load_model
    from worker.run import top1

    model, _ = load_model(str(model_dir), device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = [torch.randn(batch, 3, 224, 224, device=device, dtype=dtype) for _ in range(3)]
    eager = lambda pixels: top1(model, pixels)  # noqa: E731
    forwards = {"eager": eager}
    rates = {}
    with torch.inference_mode():
        if device.type == "cuda":
            forwards["CUDA graph"] = GraphedForward(eager, model, inputs[0])
            if COMPILE_MODES[compile_mode]:
                torch.compiler.reset()
                compiled = torch.compile(eager, mode=COMPILE_MODES[compile_mode], dynamic=False)
                forwards[f"compiled ({compile_mode}) CUDA graph"] = GraphedForward(compiled, model, inputs[0])
        for name, forward in forwards.items():
            for x in inputs:
                forward(x)
            _sync(device)
            start = time.perf_counter()
            for i in range(iters):
                forward(inputs[i % 3])
            _sync(device)
            rates[name] = batch * iters / (time.perf_counter() - start)
    return rates


def bench_decode_only(
    paths: list[Path], model_dir: Path, device: torch.device, batch: int, jpeg: str = "cuda"
) -> float:
    from worker.decode import CpuDecoder, GpuDecoder, Preprocess
    from worker.model import load_preprocessor_config

    pre = Preprocess.from_config(load_preprocessor_config(str(model_dir)))
    payloads = [p.read_bytes() for p in paths]
    with ThreadPoolExecutor(os.cpu_count()) as pool, torch.inference_mode():
        if device.type == "cuda":
            dec = GpuDecoder(pre, pool, device, jpeg=jpeg)
            out = torch.empty((batch, 3, *pre.output_hw), device=device, dtype=torch.bfloat16)
            dec(payloads[:batch], out)  # warm-up: nvjpeg handles, kernels
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for i in range(0, len(payloads), batch):
                dec(payloads[i : i + batch], out)
            torch.cuda.synchronize(device)
        else:
            dec = CpuDecoder(pre, pool)
            start = time.perf_counter()
            for i in range(0, len(payloads), batch):
                dec(payloads[i : i + batch])
    return len(payloads) / (time.perf_counter() - start)


def run_worker(
    data: Path,
    out: Path,
    model_dir: Path,
    device: str,
    decode: str,
    batch: int,
    gpu_jpeg: str = "cuda",
    compile_mode: str = "default",
) -> dict:
    from worker.config import WorkerConfig
    from worker.run import run

    shutil.rmtree(out, ignore_errors=True)
    cfg = WorkerConfig(
        input=str(data),
        output=str(out),
        model=str(model_dir),
        device=device,
        decode=decode,
        gpu_jpeg=gpu_jpeg,
        compile=compile_mode,
        batch_size=batch,
        shard_size=4 * batch,
        prefetch_batches=6,
        log_interval=5.0,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return run(cfg)


def read_labels(out: Path) -> dict[str, int]:
    labels = {}
    for part in sorted((out / "parts").glob("*.csv")):
        with part.open() as fh:
            for row in csv.DictReader(fh):
                if row["uri"] in labels:
                    raise AssertionError(f"duplicate row for {row['uri']}")
                labels[row["uri"]] = int(row["label_index"])
    return labels


def fp32_labels(
    paths: list[Path], model_dir: Path, device: torch.device, batch: int, gpu_jpeg: str | None = None
) -> dict[str, int]:
    """The model in float32 on Pillow's pixels (the HF processor's arithmetic, validated in
    tests): the reference. With ``gpu_jpeg``, on that GPU decoder's pixels instead, in float32:
    what the bf16 run would label with float32 arithmetic alone.
    """
    from transformers import AutoModelForImageClassification

    from worker.decode import CpuDecoder, GpuDecoder, Preprocess
    from worker.model import load_preprocessor_config

    pre = Preprocess.from_config(load_preprocessor_config(str(model_dir)))
    model = (
        AutoModelForImageClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)
    )
    labels = {}
    with ThreadPoolExecutor(os.cpu_count()) as pool, torch.inference_mode():
        if gpu_jpeg is None:
            decode = CpuDecoder(pre, pool)
        else:
            gpu = GpuDecoder(pre, pool, device, dtype=torch.float32, jpeg=gpu_jpeg)
            out = torch.empty((batch, 3, *pre.output_hw), device=device)
            decode = lambda data: gpu(data, out)  # noqa: E731
        for i in range(0, len(paths), batch):
            chunk = paths[i : i + batch]
            decoded = decode([p.read_bytes() for p in chunk])
            pred = model(pixel_values=decoded.pixels.to(device)).logits.argmax(-1).tolist()
            labels.update(
                {str(chunk[k]): pred[k if decoded.rows_aligned else j] for j, k in enumerate(decoded.ok)}
            )
    return labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m worker.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=8192, help="JPEGs to generate")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--workdir", default=None, help="where to put images, model and outputs (default: a temp dir)"
    )
    p.add_argument("--model-iters", type=int, default=30)
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="end-to-end runs per decoder, in one process; each is printed, and their mean is the "
        "headline (single runs of one setting spread by +-5 %% on an H100)",
    )
    p.add_argument(
        "--compile",
        choices=("none", "default", "max-autotune"),
        default="default",
        help="the worker's --compile, for the end-to-end runs and the compiled model-only row",
    )
    p.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=None,
        help="epochs of fine-tuning the whole network before measuring (default: 3 on GPU, 0 on CPU, "
        "where it would take hours); 0 keeps the random backbone under a trained linear probe",
    )
    p.add_argument("--skip-cpu-decode", action="store_true", help="skip the end-to-end Pillow-decode run")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="worker-bench-"))
    data = work / "images"
    paths = bench_images(data, args.images)
    epochs = (
        args.fine_tune_epochs if args.fine_tune_epochs is not None else (3 if device.type == "cuda" else 0)
    )
    model_dir, head = trained_model(work, paths, device, epochs)
    held_out = paths[head["train_images"] :] or paths

    figures: dict[str, float | str] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "images": len(paths),
        "batch_size": args.batch_size,
    }
    model_rates = bench_model_only(model_dir, device, args.batch_size, args.model_iters, args.compile)
    figures.update({f"model_only {name}": rate for name, rate in model_rates.items()})
    # The ratio is taken against the faster forward, whichever the worker ends up using.
    figures["model_only"] = max(model_rates.values())
    # (name, --decode, --gpu-jpeg); the fastest GPU variant is the headline.
    variants = [("Pillow", "cpu", "cuda")] if device.type != "cuda" or not args.skip_cpu_decode else []
    if device.type == "cuda":
        variants += [("nvjpeg on CUDA cores", "gpu", "cuda")]
        if hardware_jpeg_available(device):
            variants += [("hardware JPEG engines", "gpu", "hardware")]
    runs = {}
    for name, decode, jpeg in variants:
        if decode == "gpu":
            figures[f"decode_only {name}"] = bench_decode_only(
                paths, model_dir, device, args.batch_size, jpeg
            )
        elif device.type != "cuda":
            figures[f"decode_only {name}"] = bench_decode_only(paths, model_dir, device, args.batch_size)
        out = work / f"out-{decode}-{jpeg}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        summaries = [
            run_worker(data, out, model_dir, device.type, decode, args.batch_size, jpeg, args.compile)
            for _ in range(args.repeats)
        ]
        runs[name] = out
        figures[f"e2e runs {name}"] = [s["images_per_second"] for s in summaries]
        figures[f"gpu_busy runs {name}"] = [s["gpu_busy"] for s in summaries]
        # The headline is the mean: on an H100 single runs of one setting spread by +-5 %.
        figures[f"e2e {name}"] = float(np.mean(figures[f"e2e runs {name}"]))
        if device.type == "cuda":
            figures[f"peak_gpu_memory_gib {name}"] = torch.cuda.max_memory_allocated(device) / 2**30
    best = max(runs, key=lambda name: figures[f"e2e {name}"])
    figures["best"] = best
    figures["e2e_over_model_only"] = figures[f"e2e {best}"] / figures["model_only"]

    reference = fp32_labels(held_out, model_dir, device, args.batch_size)
    expected = {str(p) for p in paths}
    for name, decode, jpeg in variants:
        got = read_labels(runs[name])
        figures[f"exactly_once {name}"] = (
            "yes" if set(got) == expected and len(got) == len(expected) else "NO"
        )
        figures[f"label_agreement {name}"] = agreement(got, reference)
        if decode == "gpu":
            # Pillow's pixels and the GPU decoder's differ (nvjpeg's chroma upsampling is not
            # libjpeg's): this separates what bf16 arithmetic alone changes.
            same_pixels = fp32_labels(held_out, model_dir, device, args.batch_size, jpeg)
            figures[f"label_agreement_same_pixels {name}"] = agreement(got, same_pixels)

    rows = [
        ("device", figures["device"], ""),
        ("images (JPEG 640x480)", f"{len(paths)}", ""),
    ]
    rows += [(f"model only, {name}, img/s", f"{rate:,.0f}", "") for name, rate in model_rates.items()]
    for name in runs:
        if f"decode_only {name}" in figures:
            rows.append((f"decode only, {name}, img/s", f"{figures[f'decode_only {name}']:,.0f}", ""))
    for name in runs:
        if args.repeats > 1:
            rows.append(
                (
                    f"end to end, {name}, mean of {args.repeats} runs, img/s",
                    f"{figures[f'e2e {name}']:,.0f}",
                    f"{figures[f'e2e {name}'] / figures['model_only']:.3f} of the faster model only",
                )
            )
        for repeat, (rate, busy) in enumerate(
            zip(figures[f"e2e runs {name}"], figures[f"gpu_busy runs {name}"], strict=False)
        ):
            rows.append(
                (
                    f"end to end, {name}, run {repeat + 1} of {args.repeats}, img/s",
                    f"{rate:,.0f}",
                    f"{rate / figures['model_only']:.3f} of the faster model only"
                    + (f"; GPU busy {100 * busy:.0f} %" if device.type == "cuda" else ""),
                )
            )
    for name in runs:
        if f"peak_gpu_memory_gib {name}" in figures:
            rows.append(
                (f"peak GPU memory, {name}, GiB", f"{figures[f'peak_gpu_memory_gib {name}']:.2f}", "")
            )
    unseen = f"the {len(held_out):,} images not trained on" if len(held_out) < len(paths) else "all images"
    for name in runs:
        rows.append((f"every image exactly once, {name}", figures[f"exactly_once {name}"], ""))
        rows.append(
            (
                f"labels agree with fp32 reference, {name}",
                f"{100 * figures[f'label_agreement {name}']:.2f} %",
                f"float32 model on Pillow's pixels; {unseen}",
            )
        )
        if f"label_agreement_same_pixels {name}" in figures:
            rows.append(
                (
                    f"labels agree with fp32 on the same pixels, {name}",
                    f"{100 * figures[f'label_agreement_same_pixels {name}']:.2f} %",
                    f"float32 model on this decoder's pixels (bf16 arithmetic alone); {unseen}",
                )
            )
    rows.append(
        (
            "classifier",
            head["head"],
            f"median top-1 prob {head['median_top1_prob']:.3f}, margin {head['median_margin']:.3f}",
        )
    )
    width = max(len(r[0]) for r in rows)
    print("\n| what | figure | note |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if all(figures[f"exactly_once {name}"] == "yes" for name in runs) else 1


def agreement(labels: dict[str, int], reference: dict[str, int]) -> float:
    """The share of the reference's images given the reference's label."""
    return sum(labels.get(uri) == label for uri, label in reference.items()) / max(1, len(reference))


def hardware_jpeg_available(device: torch.device) -> bool:
    from worker.decode import HardwareJpeg

    try:
        HardwareJpeg(device)
        return True
    except Exception as exc:  # noqa: BLE001 - a missing package or engine just skips that row
        log.info("no hardware JPEG decoder: %s", exc)
        return False


if __name__ == "__main__":
    raise SystemExit(main())
