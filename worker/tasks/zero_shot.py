"""The zero-shot task: labels chosen at run time, scored by an image-text model (CLIP, SigLIP...).

The model is any ``AutoModelForZeroShotImageClassification`` checkpoint with image and text
towers (``get_image_features``, ``get_text_features``). The labels come from ``--labels`` or
``--labels-file``; each is put in ``--prompt`` (transformers' pipeline's template by default),
tokenized as ``pipeline("zero-shot-image-classification")`` tokenizes it, and embedded once per
rank, at load. Each batch then costs one image forward and one small matmul. The logits are the
model's own (normalized embeddings, times its logit scale, plus its bias where it has one) and
the scores are the pipeline's: sigmoid for SigLIP models, softmax over the labels otherwise.

The part rows are those of every label task (``worker.tasks.labels``), ``--top-k`` included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from worker.config import ConfigError, WorkerConfig
from worker.decode.spec import load_preprocess
from worker.exported import is_exported
from worker.schema import Column
from worker.storage import ObjectInfo
from worker.tasks.checkpoint import check_checkpoint, features_tensor, model_config_files
from worker.tasks.classification import check_decodable
from worker.tasks.labels import label_columns, label_rows, labels_agree, read_labels, top_k

log = logging.getLogger(__name__)

# Labels embedded per text forward at load.
TEXT_BATCH = 256
# What a tokenizer is saved as: one of these lies beside the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


class ZeroShot:
    def __init__(self, path: str, device: torch.device, cfg: WorkerConfig):
        from transformers import AutoModelForZeroShotImageClassification, AutoTokenizer

        self.k = cfg.top_k
        self.label_names = read_labels(cfg)
        kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"} if device.type == "cuda" else {}
        kwargs.setdefault("dtype", torch.float32)
        self.model = AutoModelForZeroShotImageClassification.from_pretrained(path, **kwargs).eval().to(device)
        self.preprocess = load_preprocess(path)
        self.sigmoid = "siglip" in self.model.config.model_type  # as the pipeline decides
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.text = embed_texts(
            self.model, tokenizer, [cfg.prompt.format(label) for label in self.label_names]
        )
        self.scale, self.bias = logit_scale_and_bias(self.model)

    @classmethod
    def columns(cls, cfg: WorkerConfig) -> tuple[Column, ...]:
        return label_columns(cfg.top_k)

    @classmethod
    def check_model(cls, model: str, cfg: WorkerConfig, *, decode: str = "auto") -> None:
        read_labels(cfg)
        check_image_text_model(model, cfg.project, decode)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        image = features_tensor(self.model.get_image_features(pixel_values=pixels)).float()
        image = image / image.norm(p=2, dim=-1, keepdim=True)
        logits = image @ self.text.T * self.scale
        return logits + self.bias if self.bias is not None else logits

    def scores_of(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.sigmoid else logits.softmax(-1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return top_k(self.scores_of(self.logits(pixels)), self.k)

    def agrees(self, pixels: torch.Tensor, outputs: Sequence[torch.Tensor]) -> bool:
        return labels_agree(self.logits(pixels), outputs, self.scores_of)

    def rows(self, objects: Sequence[ObjectInfo], outputs: Sequence) -> list[tuple]:
        return label_rows(objects, outputs, self.label_names, self.k)


def check_image_text_model(model: str, project: str | None = None, decode: str = "auto") -> None:
    """In seconds: ConfigError (naming --model) unless ``model`` is a zero-shot image-classification
    checkpoint with a tokenizer and an image processor the decoders reproduce.
    """
    if is_exported(model):
        raise ConfigError(
            f"--model {model}: this task needs an image-text checkpoint (CLIP, SigLIP...), not an exported model",
            "model",
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING

    with model_config_files(model, project) as (path, files):
        if path is None:
            return
        check_checkpoint(
            path,
            model,
            files,
            MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING,
            "zero-shot image-classification",
        )
        if files is not None and not files & set(TOKENIZER_FILES):
            raise ConfigError(f"--model {model} holds no tokenizer ({', '.join(TOKENIZER_FILES)})", "model")
        check_decodable(str(path), model, decode)


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' unit-norm embeddings in float32, (len(texts), dim), tokenized as the pipeline does."""
    kwargs: dict = {"padding": True}
    if "siglip" in model.config.model_type:
        kwargs.update(padding="max_length", max_length=64, truncation=True)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), TEXT_BATCH):
        inputs = tokenizer(texts[start : start + TEXT_BATCH], return_tensors="pt", **kwargs).to(device)
        chunks.append(features_tensor(model.get_text_features(**inputs)).float())
    text = torch.cat(chunks)
    return text / text.norm(p=2, dim=-1, keepdim=True)


def logit_scale_and_bias(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The factor and offset from cosine similarity to the model's logits, in float32.

    CLIP and its kin learn ``logit_scale`` (exponentiated), SigLIP a ``logit_bias`` too; ALIGN
    divides by its ``temperature``.
    """
    if hasattr(model, "logit_scale"):
        scale = model.logit_scale.float().exp()
    elif hasattr(model, "temperature"):
        scale = 1.0 / model.temperature.float()
    else:
        raise ConfigError(
            f"--model: a {type(model).__name__} has no logit scale or temperature to turn similarities into logits",
            "model",
        )
    bias = getattr(model, "logit_bias", None)
    return scale.detach(), bias.float().detach() if bias is not None else None
