"""The embedding task: each image's feature vector, as transformers' image-feature-extraction gives it.

Which vector, by model (what ``pipeline("image-feature-extraction")`` returns for it):

- a CLIP, SigLIP or other image-text model (one with ``get_image_features``): the projected
  image embedding of its vision tower, the pipeline's output for the vision tower with its
  projection (``CLIPVisionModelWithProjection``);
- a ``...VisionModelWithProjection`` checkpoint: that model's ``image_embeds``;
- any other vision model (ViT, DINOv2, ConvNeXt...): its pooled output, the pipeline's
  ``pool=True``. A checkpoint saved without its pooler's weights (an image classifier's, whose
  head reads the final CLS token instead) would get a randomly initialised pooler from
  ``AutoModel``: there the vector is that final CLS token, the features the classifier read;
- an exported model (``worker.exported``): its output, flattened per image.

``--normalize`` scales each vector to unit L2 norm; ``--embedding-dtype`` picks float32 or
float16 for the stored vectors (the forward's own precision is the device's: float32 on CPU,
bfloat16 on GPU). The part rows are ``image_id, embedding, uri``; the aggregate writes the
vectors as a fixed-size list column in Parquet and leaves them out of the CSV table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from worker.config import ConfigError, WorkerConfig
from worker.decode.spec import load_preprocess
from worker.exported import check_exported, is_exported, load_exported
from worker.exported import load_preprocess as load_exported_preprocess
from worker.results import image_id
from worker.schema import VECTOR_NUMPY, Column, encode_vector
from worker.storage import ObjectInfo
from worker.tasks.checkpoint import check_checkpoint, features_tensor, model_config_files
from worker.tasks.classification import check_decodable

log = logging.getLogger(__name__)

# A graph's vectors agree with the eager forward's where their cosines are at least these.
MEDIAN_COSINE, LEAST_COSINE = 0.999, 0.99


class Embedding:
    def __init__(self, path: str, device: torch.device, cfg: WorkerConfig):
        self.normalize = cfg.normalize
        self.kind = f"vector<{cfg.embedding_dtype}>"
        if is_exported(path):
            self.model = load_exported(path, device)
            self.features_of = lambda pixels: self.model(pixels).flatten(1)
            self.preprocess = load_exported_preprocess(path)
        else:
            self.model, self.features_of = load_model(path, device)
            self.preprocess = load_preprocess(path)

    @classmethod
    def columns(cls, cfg: WorkerConfig) -> tuple[Column, ...]:
        return (
            Column("image_id", "string"),
            Column("embedding", f"vector<{cfg.embedding_dtype}>"),
            Column("uri", "string"),
        )

    @classmethod
    def check_model(cls, model: str, cfg: WorkerConfig, *, decode: str = "auto") -> None:
        if is_exported(model):
            check_exported(model, cfg.project)
            return
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        with model_config_files(model, cfg.project) as (path, files):
            if path is None:
                return
            check_checkpoint(path, model, files, MODEL_MAPPING, "feature-extraction")
            check_decodable(str(path), model, decode)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        features = self.features_of(pixels).float()
        if self.normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return (features,)

    def agrees(self, pixels: torch.Tensor, outputs: Sequence[torch.Tensor]) -> bool:
        (reference,) = self.forward(pixels)
        cosines = torch.nn.functional.cosine_similarity(reference.float(), outputs[0].float(), dim=-1)
        return cosines.median().item() >= MEDIAN_COSINE and cosines.min().item() >= LEAST_COSINE

    def rows(self, objects: Sequence[ObjectInfo], outputs: Sequence[np.ndarray]) -> list[tuple]:
        vectors = outputs[0].astype(VECTOR_NUMPY[self.kind])  # one conversion for the whole batch
        return [
            (image_id(obj.uri), encode_vector(vector, self.kind), obj.uri)
            for obj, vector in zip(objects, vectors, strict=True)
        ]


def load_model(path: str, device: torch.device):
    """The model (bf16 + SDPA on GPU, fp32 on CPU, in eval mode) and its pixels -> features function."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    projected = [a for a in config.architectures or () if a.endswith("VisionModelWithProjection")]
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"} if device.type == "cuda" else {}
    kwargs.setdefault("dtype", torch.float32)
    model_class = getattr(transformers, projected[0]) if projected else AutoModel
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    model.eval().to(device)
    if projected:
        return model, lambda pixels: model(pixel_values=pixels).image_embeds
    if hasattr(model, "get_image_features"):
        return model, lambda pixels: features_tensor(model.get_image_features(pixel_values=pixels))
    if any(".pooler." in key or key.startswith("pooler.") for key in info.get("missing_keys", ())):
        log.warning(
            "%s has no pooler weights (an image classifier's checkpoint): its embedding is the final CLS "
            "token, the features its classifier read",
            path,
        )
        return model, lambda pixels: model(pixel_values=pixels).last_hidden_state[:, 0]

    def pooled(pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixels)
        if getattr(out, "pooler_output", None) is None:
            raise ConfigError(f"--model {path}: the model returns no pooled output to embed", "model")
        return out.pooler_output.flatten(1)

    return model, pooled
