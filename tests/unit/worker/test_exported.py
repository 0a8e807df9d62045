"""Exported models (torch.export .pt2, TorchScript) with their preprocess.json: the worker's
outputs are those of the eager model on the same pixels, from a local path or gs://.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.tasks import run_task
from worker.config import ConfigError, WorkerConfig
from worker.decode.cpu import CpuDecoder
from worker.exported import check_exported, load_preprocess, parse_preprocess
from worker.tasks.classification import Classification

PREPROCESS = {
    "size": 36,
    "crop": 32,
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "channel_order": "RGB",
}
LABELS = [f"kind {i}" for i in range(10)]


class Logits(torch.nn.Module):
    """A transformers classifier as an exported model sees it: pixels in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels).logits


@pytest.fixture(scope="module")
def eager(tiny_model):
    from transformers import AutoModelForImageClassification

    return Logits(AutoModelForImageClassification.from_pretrained(str(tiny_model)).eval()).eval()


def export(eager, folder: Path, fmt: str, labels: bool = True, device: str = "cpu") -> Path:
    """The model exported on ``device``: a trace records the device of the tensors it makes."""
    folder.mkdir(parents=True, exist_ok=True)
    eager = eager.to(device)
    example = torch.randn(2, 3, 32, 32, device=device)
    if fmt == "pt2":
        path = folder / "model.pt2"
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(eager, (example,), dynamic_shapes=({0: batch},)), str(path))
    else:
        path = folder / "model.ts"
        with torch.inference_mode(False), torch.no_grad():
            torch.jit.save(torch.jit.trace(eager, example, strict=False), str(path))
    (folder / "preprocess.json").write_text(json.dumps(PREPROCESS))
    if labels:
        (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return path


def eager_logits(eager, model_file: Path, images: list[Path]) -> torch.Tensor:
    with ThreadPoolExecutor(1) as pool, torch.inference_mode():
        decoded = CpuDecoder(load_preprocess(str(model_file)), pool)([p.read_bytes() for p in images])
        assert decoded.ok == list(range(len(images)))
        return eager(decoded.pixels)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_an_exported_classifier_gives_its_eager_models_labels_and_scores(fmt, eager, task_images, tmp_path):
    model_file = export(eager, tmp_path / "model", fmt)
    got = run_task(task_images, model_file, tmp_path / "out", top_k=3)
    probs = eager_logits(eager, model_file, task_images).softmax(-1)
    for k, path in enumerate(task_images):
        row = got[str(path)]
        scores, indices = probs[k].sort(descending=True, stable=True)
        assert json.loads(row["top_label_indices"]) == indices[:3].tolist()
        assert json.loads(row["top_labels"]) == [LABELS[i] for i in indices[:3].tolist()]
        assert json.loads(row["top_scores"]) == pytest.approx(scores[:3].tolist(), abs=1e-5)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_an_exported_embedder_gives_its_eager_models_vectors(fmt, eager, task_images, tmp_path):
    model_file = export(eager, tmp_path / "model", fmt, labels=False)
    got = run_task(task_images, model_file, tmp_path / "out", task="embedding")
    want = eager_logits(eager, model_file, task_images)
    for k, path in enumerate(task_images):
        np.testing.assert_allclose(got[str(path)]["embedding"], want[k].numpy(), rtol=1e-5, atol=1e-5)


def test_an_exported_model_on_gcs_is_fetched_with_the_files_beside_it(gcs, eager, task_images, tmp_path):
    model_file = export(eager, tmp_path / "model", "pt2")
    bucket = gcs.new_bucket("exported")
    for name in ("model.pt2", "preprocess.json", "labels.txt"):
        gcs.client.bucket(bucket).blob(f"models/v1/{name}").upload_from_filename(
            str(model_file.parent / name)
        )
    gcs.client.bucket(bucket).blob("models/v1/unrelated.bin").upload_from_string(b"not fetched")
    uri = f"gs://{bucket}/models/v1/model.pt2"
    cfg = WorkerConfig(input="/i", output="/o", model=uri)
    Classification.check_model(uri, cfg)
    got = run_task(task_images, uri, tmp_path / "out", model_cache=str(tmp_path / "cache"))
    local = run_task(task_images, model_file, tmp_path / "local")
    assert {u: r["classification"] for u, r in got.items()} == {
        u: r["classification"] for u, r in local.items()
    }
    fetched = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert fetched == {"model.pt2", "preprocess.json", "labels.txt"}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"interpolation": "cubic"}, "interpolation 'cubic' is not one of"),
        ({"channel_order": "GRB"}, "channel_order must be RGB or BGR"),
        ({"crop": None, "size": 36}, "add a crop"),
        ({"mean": [0.5, 0.5]}, "mean and std need 3 channels"),
        ({"resize": 3}, "unknown key(s) resize"),
    ],
)
def test_a_bad_preprocess_file_is_named_in_one_line(change, message):
    spec = {k: v for k, v in {**PREPROCESS, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse_preprocess(json.dumps(spec).encode(), "m/preprocess.json")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.parameter == "model"


def test_preprocess_file_is_the_decoders_steps():
    pre = parse_preprocess(json.dumps({**PREPROCESS, "channel_order": "BGR"}).encode(), "p")
    assert pre.resize == ("shortest_edge", 36) and pre.crops == ((32, 32),) and pre.output_hw == (32, 32)
    assert pre.flip_channels and pre.rescale_factor == pytest.approx(1 / 255) and pre.gpu_inexact() is None
    fixed = parse_preprocess(json.dumps({"size": [24, 40]}).encode(), "p")
    assert fixed.resize == ("fixed", 24, 40) and fixed.mean is None and fixed.output_hw == (24, 40)


def test_check_exported_names_a_missing_preprocess_file(eager, tmp_path):
    model_file = export(eager, tmp_path / "model", "torchscript")
    check_exported(str(model_file))
    (model_file.parent / "preprocess.json").unlink()
    with pytest.raises(ConfigError, match="no preprocess.json beside it"):
        check_exported(str(model_file))
    with pytest.raises(ConfigError, match="no such file"):
        check_exported(str(tmp_path / "missing.pt2"))
