"""The image-classification task: its fp32 head on bf16 features, its scores, its model check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.helpers import jpeg_bytes
from worker.config import ConfigError
from worker.tasks.classification import (
    check_model,
    identity,
    keep_classifier_in_fp32,
    score_function,
    sigmoid,
    softmax,
)


def test_classifier_runs_in_fp32_on_bf16_features(tiny_model):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(tiny_model), dtype=torch.bfloat16).eval()
    keep_classifier_in_fp32(model)
    assert model.classifier.weight.dtype == torch.float32
    assert next(model.vit.parameters()).dtype == torch.bfloat16
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        logits = model(pixel_values=pixels.bfloat16()).logits
        features = model.vit(pixel_values=pixels.bfloat16()).last_hidden_state[:, 0]
        expected = features.float() @ model.classifier.weight.T + model.classifier.bias
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected)


def _copy_model(tiny_model: Path, dest: Path, **processor_changes) -> Path:
    shutil.copytree(tiny_model, dest)
    if processor_changes:
        path = dest / "preprocessor_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **processor_changes}))
    return dest


def test_check_model_accepts_a_local_image_classifier(tiny_model):
    check_model(str(tiny_model))
    check_model(str(tiny_model), decode="gpu")


def _not_a_model(tmp_path: Path, tiny_model: Path, kind: str) -> Path:
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    target = tmp_path / kind
    if kind == "empty folder":
        target.mkdir()
    elif kind == "folder of images":
        target.mkdir()
        (target / "a.jpg").write_bytes(jpeg_bytes(1))
    elif kind == "no weights":
        target.mkdir()
        for name in ("config.json", "preprocessor_config.json"):
            shutil.copy(tiny_model / name, target / name)
    elif kind == "text model":
        BertModel(
            BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
        ).save_pretrained(target)
    elif kind == "backbone without a head":
        ViTModel(
            ViTConfig(image_size=32, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
        ).save_pretrained(target)
        shutil.copy(tiny_model / "preprocessor_config.json", target)
    elif kind == "no image processor":
        _copy_model(tiny_model, target)
        (target / "preprocessor_config.json").unlink()
    elif kind == "a processor the worker does not reproduce":
        _copy_model(tiny_model, target, image_processor_type="LevitImageProcessor")
    elif kind == "a file":
        target.write_bytes(b"weights?")
    return target


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("empty folder", "holds no config.json"),
        ("folder of images", "holds no config.json"),
        ("no weights", "holds no weights"),
        ("text model", "'bert' model, which has no image-classification class"),
        ("backbone without a head", "holds a ViTModel, not an image classifier"),
        ("no image processor", "preprocessor_config.json is missing"),
        ("a processor the worker does not reproduce", "LevitImageProcessor changes the step"),
        ("a file", "is a file"),
        ("no such folder", "no such directory"),
    ],
)
def test_check_model_names_what_is_wrong_in_one_line(kind, reason, tmp_path, tiny_model):
    with pytest.raises(ConfigError) as caught:
        check_model(str(_not_a_model(tmp_path, tiny_model, kind)))
    assert reason in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("--model") and caught.value.parameter == "model"


def test_check_model_refuses_gpu_decode_it_cannot_reproduce(tmp_path, tiny_model):
    nearest = _copy_model(tiny_model, tmp_path / "nearest", resample=0)
    check_model(str(nearest))  # auto: the GPU run decodes these with Pillow instead
    with pytest.raises(
        ConfigError, match="--decode gpu can't reproduce ViTImageProcessor .*NEAREST"
    ) as caught:
        check_model(str(nearest), decode="gpu")
    assert caught.value.parameter == "decode"


def test_check_model_reads_only_the_configs_of_a_gcs_model(gcs, tiny_model):
    bucket = gcs.new_bucket("model")
    for path in tiny_model.iterdir():
        gcs.client.bucket(bucket).blob(f"models/tiny/{path.name}").upload_from_filename(str(path))
    check_model(f"gs://{bucket}/models/tiny")
    with pytest.raises(ConfigError, match="no objects under that prefix"):
        check_model(f"gs://{bucket}/models/none")
    gcs.client.bucket(bucket).blob("models/tiny/model.safetensors").delete()
    with pytest.raises(ConfigError, match="holds no weights"):
        check_model(f"gs://{bucket}/models/tiny")


def test_check_model_of_an_unreachable_hub_leaves_it_to_the_worker(monkeypatch, caplog):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    check_model("some-org/some-model-not-cached")
    assert "could not reach the hub" in caplog.text
    with pytest.raises(ConfigError, match="nor a valid hub id"):
        check_model("not a hub id")


@pytest.mark.parametrize(
    "config,expected",
    [
        (dict(num_labels=5), softmax),
        (dict(num_labels=5, problem_type="single_label_classification"), softmax),
        (dict(num_labels=5, problem_type="multi_label_classification"), sigmoid),
        (dict(num_labels=1), sigmoid),
        (dict(num_labels=1, problem_type="regression"), identity),
    ],
)
def test_scores_are_the_pipelines_default_function(config, expected):
    from transformers import ViTConfig

    assert score_function(ViTConfig(**config)) is expected
