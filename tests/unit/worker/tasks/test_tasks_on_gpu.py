"""On a GPU (skipped without one): every task through the worker's GPU path — JPEGs decoded on the
GPU, bf16, the forward captured as a CUDA graph — against the same run on the CPU.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.support.tasks import run_task
from tests.unit.worker.test_exported import Logits, export

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _both(task_images, model, tmp_path, caplog, **settings):
    cpu = run_task(task_images, model, tmp_path / "cpu", **settings)
    with caplog.at_level(logging.INFO, logger="worker.cuda_graph"):
        gpu = run_task(task_images, model, tmp_path / "gpu", device="cuda", **settings)
    assert "forward: the CUDA graph" in caplog.text, caplog.text
    assert set(cpu) == set(gpu)
    return cpu, gpu


def _cosines(cpu, gpu):
    return [
        float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        for a, b in (
            (cpu[u]["embedding"].astype(np.float64), gpu[u]["embedding"].astype(np.float64)) for u in cpu
        )
    ]


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_embedding_on_the_gpu(family, models, task_images, tmp_path, caplog):
    cpu, gpu = _both(task_images, models(family), tmp_path, caplog, task="embedding")
    assert min(_cosines(cpu, gpu)) >= 0.99


def test_zero_shot_on_the_gpu(models, task_images, tmp_path, caplog):
    cpu, gpu = _both(
        task_images, models("siglip"), tmp_path, caplog, task="zero-shot", labels="cat,dog,car", top_k=2
    )
    for uri, row in cpu.items():
        assert json.loads(gpu[uri]["top_scores"]) == pytest.approx(json.loads(row["top_scores"]), abs=0.02)


@pytest.mark.parametrize("fmt,task", [("pt2", "classification"), ("torchscript", "embedding")])
def test_an_exported_model_on_the_gpu(fmt, task, tiny_model, task_images, tmp_path, caplog):
    from transformers import AutoModelForImageClassification

    eager = Logits(AutoModelForImageClassification.from_pretrained(str(tiny_model)).eval()).eval()
    model_file = export(eager, tmp_path / "model", fmt, device="cuda")
    cpu_file = export(eager, tmp_path / "model-cpu", fmt)
    cpu = run_task(task_images, cpu_file, tmp_path / "cpu", task=task)
    with caplog.at_level(logging.INFO, logger="worker.cuda_graph"):
        gpu = run_task(task_images, model_file, tmp_path / "gpu", device="cuda", task=task)
    assert "forward: the CUDA graph" in caplog.text, caplog.text
    if task == "embedding":
        assert min(_cosines(cpu, gpu)) >= 0.99
    else:
        for uri, row in cpu.items():
            assert float(gpu[uri]["score"]) == pytest.approx(float(row["score"]), abs=0.02)
