"""The benchmarks' images and classifier, made once under a work folder and reused.

``bench_images`` generates COCO-like JPEGs (640x480 and 480x640, photo statistics);
``trained_model`` builds a random-weight model of google/vit-base-patch16-224's architecture
and trains it as a classifier of the first ``TRAIN_IMAGES`` images (``train_classifier``),
so that label agreement between bf16 and fp32 runs means what it means for a user's model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipelines.dev.random_model import make_model

log = logging.getLogger("benchmarks.classifier")


def _make_jpeg(args: tuple[int, Path]) -> int:
    from worker.decode.jpeg import photo_like_jpeg

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

    from worker.decode.cpu import CpuDecoder
    from worker.decode.spec import load_preprocess

    pre = load_preprocess(str(model_dir))
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
