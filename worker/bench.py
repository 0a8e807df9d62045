"""Throughput benchmark: ``python -m worker.bench`` on any GPU machine (or ``--device cpu`` anywhere).

It generates COCO-like JPEGs (640x480, ~50-150 KB), builds a random-weight model of
google/vit-base-patch16-224's architecture, and prints one table:

- model only (bf16 + SDPA on random device tensors),
- decode only (nvjpeg batched decode + resize + normalize),
- end to end through the real worker (read files -> decode -> infer -> commit CSV
  parts), once with Pillow decode and once with GPU decode,
- the end-to-end / model-only ratio, and peak GPU memory.

It then checks correctness at speed: every image appears exactly once in the
parts, and the bf16 labels agree with a float32 reference (Pillow + the image
processor's arithmetic + the model in fp32).
"""

from __future__ import annotations

import argparse
import csv
import io
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

from worker.random_model import make_model

log = logging.getLogger("worker.bench")


def _make_jpeg(args: tuple[int, Path]) -> int:
    from PIL import Image

    seed, path = args
    rng = np.random.default_rng(seed)
    w, h = (640, 480) if seed % 4 else (480, 640)  # COCO has both orientations
    low = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(70, 93)))
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_dataset(root: Path, n: int) -> list[Path]:
    paths = [root / f"{i // 1000:03d}" / f"img_{i:06d}.jpg" for i in range(n)]
    for d in {p.parent for p in paths}:
        d.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        sizes = list(pool.map(_make_jpeg, [(i, p) for i, p in enumerate(paths)], chunksize=64))
    log.info("generated %d JPEGs, %.0f KB mean (%.0f-%.0f KB)", n, np.mean(sizes) / 1e3,
             min(sizes) / 1e3, max(sizes) / 1e3)
    return paths


@torch.inference_mode()
def align_head_with_features(model_dir: Path, paths: list[Path], device: torch.device, n: int = 1024) -> dict:
    """Give the random model a head that discriminates, like a trained one's.

    A random ViT maps every image to nearly the same feature vector, so its logits are
    near-ties (median top-1 probability ~0.005 over 1000 classes) and any rounding flips
    the argmax; a label-agreement figure on it would measure coin flips. Pointing each
    class row at a random mix of the features' principal directions (centred, so the
    common component is ignored) gives margins like a trained classifier's. The backbone
    and every timing are unchanged.
    """
    from transformers import AutoModelForImageClassification

    from worker.decode import CpuDecoder, Preprocess
    from worker.model import load_preprocessor_config

    pre = Preprocess.from_config(load_preprocessor_config(str(model_dir)))
    model = AutoModelForImageClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        pixels = CpuDecoder(pre, pool)([p.read_bytes() for p in paths[:n]]).pixels.to(device)
    feats = torch.cat([model.vit(pixel_values=pixels[i:i + 128]).last_hidden_state[:, 0]
                       for i in range(0, len(pixels), 128)])
    mean = feats.mean(0)
    _, sv, vt = torch.linalg.svd(feats - mean, full_matrices=False)
    k = min(16, vt.shape[0])
    # The top principal directions carry the variation between images; a random mix of
    # them, scaled to logits of std ~4 (about a trained ImageNet head's), is the head.
    gen = torch.Generator(device="cpu").manual_seed(0)
    mix = torch.randn(model.config.num_labels, k, generator=gen).to(device)
    weight = mix @ vt[:k]
    weight *= 4.0 / ((feats - mean) @ weight.T).std()
    model.classifier.weight.copy_(weight)
    model.classifier.bias.copy_(-(weight @ mean))
    model.save_pretrained(model_dir)
    probs = model.classifier(feats).softmax(-1).topk(2, dim=-1).values
    return {"median_top1_prob": probs[:, 0].median().item(),
            "median_margin": (probs[:, 0] - probs[:, 1]).median().item()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model_only(model_dir: Path, device: torch.device, batch: int, iters: int) -> float:
    from worker.model import load_model

    model, _ = load_model(str(model_dir), device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = [torch.randn(batch, 3, 224, 224, device=device, dtype=dtype) for _ in range(3)]
    with torch.inference_mode():
        for x in inputs:
            model(pixel_values=x)
        _sync(device)
        start = time.perf_counter()
        for i in range(iters):
            model(pixel_values=inputs[i % 3]).logits.float().softmax(-1).max(-1)
        _sync(device)
    return batch * iters / (time.perf_counter() - start)


def bench_decode_only(paths: list[Path], model_dir: Path, device: torch.device, batch: int) -> float:
    from worker.decode import CpuDecoder, GpuDecoder, Preprocess
    from worker.model import load_preprocessor_config

    pre = Preprocess.from_config(load_preprocessor_config(str(model_dir)))
    payloads = [p.read_bytes() for p in paths]
    with ThreadPoolExecutor(os.cpu_count()) as pool, torch.inference_mode():
        if device.type == "cuda":
            dec = GpuDecoder(pre, pool, device)
            out = torch.empty((batch, 3, *pre.output_hw), device=device, dtype=torch.bfloat16)
            dec(payloads[:batch], out)  # warm-up: nvjpeg handles, kernels
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for i in range(0, len(payloads), batch):
                dec(payloads[i:i + batch], out)
            torch.cuda.synchronize(device)
        else:
            dec = CpuDecoder(pre, pool)
            start = time.perf_counter()
            for i in range(0, len(payloads), batch):
                dec(payloads[i:i + batch])
    return len(payloads) / (time.perf_counter() - start)


def run_worker(data: Path, out: Path, model_dir: Path, device: str, decode: str, batch: int) -> dict:
    from worker.config import WorkerConfig
    from worker.run import run

    shutil.rmtree(out, ignore_errors=True)
    cfg = WorkerConfig(input=str(data), output=str(out), model=str(model_dir), device=device, decode=decode,
                       batch_size=batch, shard_size=4 * batch, prefetch_batches=6,
                       log_interval=5.0)
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


def fp32_reference_labels(paths: list[Path], model_dir: Path, device: torch.device, batch: int) -> dict[str, int]:
    """Pillow + the HF processor's arithmetic (validated in tests) + the model in float32."""
    from transformers import AutoModelForImageClassification

    from worker.decode import CpuDecoder, Preprocess
    from worker.model import load_preprocessor_config

    pre = Preprocess.from_config(load_preprocessor_config(str(model_dir)))
    model = AutoModelForImageClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)
    labels = {}
    with ThreadPoolExecutor(os.cpu_count()) as pool, torch.inference_mode():
        dec = CpuDecoder(pre, pool)
        for i in range(0, len(paths), batch):
            chunk = paths[i:i + batch]
            decoded = dec([p.read_bytes() for p in chunk])
            pred = model(pixel_values=decoded.pixels.to(device)).logits.argmax(-1).tolist()
            labels.update({str(chunk[k]): pred[j] for j, k in enumerate(decoded.ok)})
    return labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8192, help="JPEGs to generate")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workdir", default=None, help="where to put images, model and outputs (default: a temp dir)")
    p.add_argument("--model-iters", type=int, default=30)
    p.add_argument("--skip-cpu-decode", action="store_true", help="skip the end-to-end Pillow-decode run")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="worker-bench-"))
    data = work / "images"
    paths = sorted(data.rglob("*.jpg")) if data.is_dir() else []
    if len(paths) != args.images:
        shutil.rmtree(data, ignore_errors=True)
        paths = make_dataset(data, args.images)
    model_dir = work / "vit-base-patch16-224-random"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
        head = align_head_with_features(model_dir, paths, device)
        (model_dir / "head.json").write_text(json.dumps(head))
    head = json.loads((model_dir / "head.json").read_text())

    figures: dict[str, float | str] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                       else "cpu", "images": len(paths), "batch_size": args.batch_size}
    figures["model_only"] = bench_model_only(model_dir, device, args.batch_size, args.model_iters)
    figures["decode_only"] = bench_decode_only(paths, model_dir, device, args.batch_size)
    runs = {}
    decodes = ["gpu"] if device.type == "cuda" else []
    if device.type != "cuda" or not args.skip_cpu_decode:
        decodes.insert(0, "cpu")
    for decode in decodes:
        summary = run_worker(data, work / f"out-{decode}", model_dir, device.type, decode, args.batch_size)
        runs[decode] = summary
        figures[f"e2e_{decode}_decode"] = summary["images_per_second"]
    if device.type == "cuda":
        figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    best = "gpu" if "gpu" in runs else "cpu"
    figures["e2e_over_model_only"] = figures[f"e2e_{best}_decode"] / figures["model_only"]

    got = read_labels(work / f"out-{best}")
    expected = {str(p) for p in paths}
    figures["exactly_once"] = "yes" if set(got) == expected and len(got) == len(expected) else "NO"
    reference = fp32_reference_labels(paths, model_dir, device, args.batch_size)
    agree = sum(got.get(u) == lab for u, lab in reference.items())
    figures["label_agreement_vs_fp32"] = agree / max(1, len(reference))

    rows = [
        ("device", figures["device"]),
        ("images (JPEG 640x480)", f"{len(paths)}"),
        ("model only, img/s", f"{figures['model_only']:,.0f}"),
        ("decode only, img/s", f"{figures['decode_only']:,.0f}"),
    ]
    for decode in decodes:
        rows.append((f"end to end, {'Pillow' if decode == 'cpu' else 'nvjpeg'} decode, img/s",
                     f"{figures[f'e2e_{decode}_decode']:,.0f}"))
    rows.append(("end to end / model only", f"{figures['e2e_over_model_only']:.3f}"))
    if "peak_gpu_memory_gib" in figures:
        rows.append(("peak GPU memory, GiB", f"{figures['peak_gpu_memory_gib']:.2f}"))
    rows.append(("every image exactly once", figures["exactly_once"]))
    rows.append(("labels agree with fp32 reference", f"{100 * figures['label_agreement_vs_fp32']:.2f} %"))
    rows.append(("reference median top-1 prob / margin",
                 f"{head['median_top1_prob']:.3f} / {head['median_margin']:.3f}"))
    width = max(len(r[0]) for r in rows)
    print("\n| what | figure |\n|---|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["exactly_once"] == "yes" else 1


if __name__ == "__main__":
    raise SystemExit(main())
