"""The image-classification task: any ``AutoModelForImageClassification`` model, top-1 label and score.

Its part rows are ``image_id, classification, label_index, score, uri``: the object's stem, the
top-1 label's name and index, that label's softmax probability, and the object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from worker.decode.spec import Preprocess
from worker.results import PART_COLUMNS, image_id
from worker.storage import ObjectInfo

NAME = "image-classification"


class ImageClassification:
    """The model, its label names and its preprocessing, loaded for inference on ``device``."""

    columns = PART_COLUMNS

    def __init__(self, path: str, device: torch.device):
        self.model, self.label_names = load_model(path, device)
        self.preprocess = Preprocess.from_config(load_preprocessor_config(path))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return top1(self.model, pixels)

    def rows(self, objects: Sequence[ObjectInfo], outputs: Sequence[list]) -> list[tuple]:
        scores, labels = outputs
        return [
            (image_id(obj.uri), self.label_names[label], label, f"{score:.6f}", obj.uri)
            for obj, score, label in zip(objects, scores, labels, strict=True)
        ]


def load(path: str, device: torch.device) -> ImageClassification:
    return ImageClassification(path, device)


def top1(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-1 softmax probability and label index of each image, in float32."""
    logits = model(pixel_values=pixels).logits
    return logits.float().softmax(-1).max(-1)


def load_model(path: str, device: torch.device):
    """AutoModelForImageClassification: bf16 + SDPA on GPU, fp32 on CPU, in eval mode."""
    from transformers import AutoModelForImageClassification

    if device.type == "cuda":
        model = AutoModelForImageClassification.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    else:
        model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32)
    model.eval().to(device)
    if device.type == "cuda":
        keep_classifier_in_fp32(model)
    labels = model.config.id2label or {}
    num_labels = model.config.num_labels
    label_names = [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
    return model, label_names


def keep_classifier_in_fp32(model) -> None:
    """Run the classification head in float32 on bf16 features.

    The head turns the features into logits whose top two are often close; rounding the
    logits' inputs and weights to bf16 is what flips most labels against a float32 run
    (benchmarks/NOTES.md), and the head is a tiny share of the FLOPs.
    Hugging Face image classifiers name their head ``classifier``.
    """
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        return
    head.float()
    head.register_forward_pre_hook(
        lambda module, args: tuple(
            a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )
    )


def load_preprocessor_config(path: str) -> dict:
    """The image processor's settings as a plain dict (size, mean, std, resample, crop...)."""
    cfg_path = Path(path) / "preprocessor_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: the model needs an image processor config")
    return json.loads(cfg_path.read_text())
