"""Random-weight image classifiers built locally, for machines with no internet.

``make_model(out)`` writes a model with the architecture of ``google/vit-base-patch16-224``
(ViT-B/16: 224 px, 16 px patches, 768 hidden, 12 layers, 1000 labels) and the same image
processor settings, so throughput and memory match the real model. Its weights are random,
and its labels say so (``random_class_0`` ...): its classifications mean nothing.
``tiny=True`` makes a ViT small enough for tests on one CPU core.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from worker.random_model import DEFAULT_MODEL, NOTE_FILE, RANDOM_LABEL, make_model  # noqa: F401 - re-exported


def cached_random_model(cache_root: str | Path | None = None) -> Path:
    """The random-weight ViT-B/16, built once into a local cache and reused afterwards."""
    root = Path(cache_root or os.environ.get("BATCH_INFERENCE_MODEL_CACHE")
                or Path.home() / ".cache" / "batch-inference" / "models")
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
