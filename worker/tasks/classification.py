"""The classification task: an image classifier's best label (or k best) and its score.

The model is any ``AutoModelForImageClassification`` checkpoint, or an exported model
(``worker.exported``) whose output is the logits, named by the labels.txt beside it. Its part
rows are ``worker.tasks.labels.label_columns``: the object's stem, the best label's name and
index, that label's score, the k best with ``--top-k``, and the object. The score is what
``pipeline("image-classification")`` reports for the model: the softmax probability, or the
sigmoid for multi-label (and single-label) heads, or the raw logit for regression heads; an
exported model's is the softmax.

``check_model`` answers, in seconds and before any GPU is provisioned, whether a model is one
the worker can run: it loads as an image classifier and its image processor is one the decoders
reproduce (``worker.decode.spec``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from worker.config import ConfigError, WorkerConfig
from worker.decode.spec import Preprocess, load_preprocess
from worker.exported import check_exported, is_exported, load_exported, load_label_names
from worker.exported import load_preprocess as load_exported_preprocess
from worker.schema import Column
from worker.storage import ObjectInfo
from worker.tasks.checkpoint import check_checkpoint, model_config_files
from worker.tasks.labels import label_columns, label_rows, labels_agree, top_k

log = logging.getLogger(__name__)


class Classification:
    """The model, its label names and its preprocessing, loaded for inference on ``device``."""

    def __init__(self, path: str, device: torch.device, cfg: WorkerConfig):
        self.k = cfg.top_k
        if is_exported(path):
            self.model = load_exported(path, device)
            self.logits_of = self.model
            self.preprocess: Preprocess = load_exported_preprocess(path)
            self.label_names = load_label_names(path)
            self.scores_of = softmax
        else:
            self.model, self.label_names = load_model(path, device)
            self.logits_of = lambda pixels: self.model(pixel_values=pixels).logits
            self.preprocess = load_preprocess(path)
            self.scores_of = score_function(self.model.config)

    @classmethod
    def columns(cls, cfg: WorkerConfig) -> tuple[Column, ...]:
        return label_columns(cfg.top_k)

    @classmethod
    def check_model(cls, model: str, cfg: WorkerConfig, *, decode: str = "auto") -> None:
        if is_exported(model):
            check_exported(model, cfg.project)
        else:
            check_model(model, project=cfg.project, decode=decode)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best scores and label indices of each image, in float32."""
        return top_k(self.scores_of(self.logits_of(pixels).float()), self.k)

    def agrees(self, pixels: torch.Tensor, outputs: Sequence[torch.Tensor]) -> bool:
        return labels_agree(self.logits_of(pixels), outputs, self.scores_of)

    def rows(self, objects: Sequence[ObjectInfo], outputs: Sequence) -> list[tuple]:
        names = self.label_names
        if names is None:  # an exported model without labels.txt: its output indices
            names = _IndexNames()
        return label_rows(objects, outputs, names, self.k)


class _IndexNames:
    """Label names where none are known: LABEL_<index>, as transformers names them."""

    def __getitem__(self, index: int) -> str:
        return f"LABEL_{index}"


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1)


def sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return logits.sigmoid()


def identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def score_function(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function of the logits that ``pipeline("image-classification")`` reports by default."""
    if config.problem_type == "regression":
        return identity
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return sigmoid
    return softmax


def top1(
    model, pixels: torch.Tensor, scores_of: Callable[[torch.Tensor], torch.Tensor] = softmax
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-1 score and label index of each image, in float32."""
    logits = model(pixel_values=pixels).logits
    return scores_of(logits.float()).max(-1)


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


def check_model(model: str, *, project: str | None = None, decode: str = "auto") -> None:
    """Check quickly that ``model`` (a local directory, a hub id or a gs:// directory) is an
    image classifier whose preprocessing the worker reproduces; reads only its config files.

    A hub model is checked from the local Hugging Face cache, else from the hub; where the hub
    can't be reached the check is left to the worker's start-up (with a warning).

    Raises:
        ConfigError: What is wrong, in one line naming --model (or --decode).
    """
    with model_config_files(model, project) as (path, files):
        if path is None:
            return
        check_model_dir(path, model, files)
        check_decodable(str(path), model, decode)


def check_decodable(path: str, model: str, decode: str) -> None:
    """ConfigError unless the image processor under ``path`` is one the decoders reproduce
    (exactly on the GPU, with ``decode`` gpu).
    """
    pre = load_preprocess(path)
    if decode == "gpu" and (inexact := pre.gpu_inexact()):
        raise ConfigError(
            f"--decode gpu can't reproduce {pre.processor} of --model {model} exactly ({inexact}): "
            "use --decode auto or cpu",
            "decode",
        )


def check_model_dir(path: Path, model: str, files: set[str] | None) -> None:
    """ConfigError unless ``path`` holds the config of an image-classification model and ``files``
    (the names of the model's files; None where unknown) its weights.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    config = check_checkpoint(
        path, model, files, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING, "image-classification"
    )
    heads = [a for a in config.architectures or () if "ForImageClassification" in a]
    if config.architectures and not heads:
        raise ConfigError(
            f"--model {model} holds a {config.architectures[0]}, not an image classifier: its "
            "classification head would be random",
            "model",
        )
