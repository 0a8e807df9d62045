"""The embedding task against transformers' own image-feature-extraction pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.tasks import run_task
from worker.config import ConfigError, WorkerConfig
from worker.tasks.embedding import Embedding


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _pipeline_vectors(family: str, model_dir, images) -> dict[str, np.ndarray]:
    """What image-feature-extraction gives: the pooled output of ViT and DINOv2 (pool=True); for
    CLIP, the output of its vision tower with projection (the pipeline can't run a whole CLIPModel,
    which needs text): the projected image embedding.
    """
    from transformers import AutoImageProcessor, CLIPModel, CLIPVisionModelWithProjection, pipeline

    if family == "clip":
        full = CLIPModel.from_pretrained(str(model_dir))
        config = full.config.vision_config
        config.projection_dim = full.config.projection_dim
        tower = CLIPVisionModelWithProjection(config).eval()
        tower.vision_model.load_state_dict(full.vision_model.state_dict())
        tower.visual_projection.load_state_dict(full.visual_projection.state_dict())
        extract = pipeline(
            "image-feature-extraction",
            model=tower,
            image_processor=AutoImageProcessor.from_pretrained(str(model_dir)),
            device="cpu",
        )
        return {str(p): np.asarray(extract(str(p))) for p in images}
    extract = pipeline("image-feature-extraction", model=str(model_dir), device="cpu")
    return {str(p): np.asarray(extract(str(p), pool=True)) for p in images}


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip"])
def test_vectors_are_the_pipelines(family, models, task_images, tmp_path):
    model = models(family)
    got = run_task(task_images, model, tmp_path / "out", task="embedding")
    want = _pipeline_vectors(family, model, task_images)
    assert len(got) == len(task_images)
    for uri, vector in want.items():
        assert got[uri]["embedding"].shape == (vector.size,) and got[uri]["embedding"].dtype == np.float32
        assert _cosine(got[uri]["embedding"], vector) >= 0.9999, uri
        assert np.allclose(got[uri]["embedding"], vector.ravel(), atol=1e-4, rtol=1e-3)


def test_normalized_float16_vectors(models, task_images, tmp_path):
    model = models("dinov2")
    plain = run_task(task_images, model, tmp_path / "plain", task="embedding")
    half = run_task(
        task_images, model, tmp_path / "half", task="embedding", normalize=True, embedding_dtype="float16"
    )
    for uri, row in half.items():
        vector = row["embedding"]
        assert vector.dtype == np.float16
        assert np.linalg.norm(vector.astype(np.float64)) == pytest.approx(1.0, abs=2e-3)
        assert _cosine(vector, plain[uri]["embedding"]) >= 0.9999


def test_siglip_embedding_is_its_image_features(models, task_images, tmp_path):
    import torch
    from transformers import SiglipModel

    from worker.decode.cpu import CpuDecoder
    from worker.decode.spec import load_preprocess

    model = models("siglip")
    got = run_task(task_images[:3], model, tmp_path / "out", task="embedding")
    reference = SiglipModel.from_pretrained(str(model)).eval()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, torch.inference_mode():
        decoded = CpuDecoder(load_preprocess(str(model)), pool)([p.read_bytes() for p in task_images[:3]])
        out = reference.get_image_features(pixel_values=decoded.pixels)
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
    for k, path in enumerate(task_images[:3]):
        assert _cosine(got[str(path)]["embedding"], features[k].numpy()) >= 0.9999


def test_check_model_refuses_a_model_without_an_image_processor(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    cfg = WorkerConfig(input="/i", output="/o", model=str(tmp_path / "bert"), task="embedding")
    with pytest.raises(ConfigError, match="image processor config") as caught:
        Embedding.check_model(cfg.model, cfg)
    assert "\n" not in str(caught.value)
