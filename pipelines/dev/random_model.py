"""Random-weight image classifiers built locally, for machines with no internet.

``make_model(out)`` writes a model with the architecture of ``google/vit-base-patch16-224``
(ViT-B/16: 224 px, 16 px patches, 768 hidden, 12 layers, 1000 labels) and the same image
processor settings, so throughput and memory match the real model. Its weights are random,
and its labels say so (``random_class_0`` ...): its classifications mean nothing.
``tiny=True`` makes a ViT small enough for tests on one CPU core.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from worker.config import DEFAULT_MODEL

RANDOM_LABEL = "random_class_{}"
NOTE_FILE = "RANDOM_WEIGHTS.txt"


def make_model(out: str | Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """Create a random-weight ViT image classifier under ``out`` (save_pretrained layout).

    Args:
        out: Directory to write; created if missing, files in it are overwritten.
        tiny: A 32 px, 2-layer ViT with 10 labels instead of ViT-B/16.
        seed: Seed for the random weights, so two builds are identical.

    Returns:
        The directory, ready for ``--model``.
    """
    import torch
    from PIL import Image

    out = Path(out)
    if tiny:
        image_size, num_labels = 32, 10
        arch = dict(
            patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
    else:
        image_size, num_labels = 224, 1000
        arch = {}  # ViTConfig's defaults are ViT-B/16, the architecture of google/vit-base-patch16-224
    labels = {i: RANDOM_LABEL.format(i) for i in range(num_labels)}
    torch.manual_seed(seed)
    with _quiet_transformers():
        # Imported here: without torchvision, importing ViTImageProcessor itself logs a notice.
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        config = ViTConfig(
            image_size=image_size,
            num_labels=num_labels,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            **arch,
        )
        ViTForImageClassification(config).eval().save_pretrained(out)
        ViTImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            resample=Image.Resampling.BILINEAR,
        ).save_pretrained(out)
    (out / NOTE_FILE).write_text(
        f"Random weights with the architecture of {'a tiny ViT' if tiny else DEFAULT_MODEL}; "
        "its classifications are meaningless. Made by `python -m pipelines make-model`.\n"
    )
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or backend notices (e.g. "torchvision not installed") for a local save."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def cached_random_model(cache_root: str | Path | None = None) -> Path:
    """The random-weight ViT-B/16, built once into a local cache and reused afterwards."""
    root = Path(
        cache_root
        or os.environ.get("BATCH_INFERENCE_MODEL_CACHE")
        or Path.home() / ".cache" / "batch-inference" / "models"
    )
    target = root / "random-weights" / DEFAULT_MODEL.replace("/", "--")
    if not (target / NOTE_FILE).exists():  # the note is written last: its presence means complete
        make_model(target)
    return target


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (and offline mode is not forced)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_model_cached(model: str) -> bool:
    """Whether a hub model is already in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return False
    return True
