"""Tasks through the whole pipeline (kfp.local, real torchrun): docs/tasks.md's own task class,
and zero-shot labels given as the pipeline's list parameter.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from pipelines.dev.local_run import run_pipeline_locally
from pipelines.dev.sample_images import CORRUPT_NAME, make_sample_images
from tests.support import ROOT


def _worked_example() -> str:
    """The Python block of docs/tasks.md's worked example, as a reader would copy it."""
    text = (ROOT / "docs" / "tasks.md").read_text(encoding="utf-8")
    section = text.split("### Worked example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_documented_user_task_runs_through_the_pipeline(models, tmp_path, monkeypatch):
    from transformers import pipeline

    package = tmp_path / "site" / "quality"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "clip_iqa.py").write_text(_worked_example())
    # Importable where the worker runs: the launcher's torchrun inherits the environment.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sample = make_sample_images(tmp_path / "images", 9)
    model = models("clip")

    run = run_pipeline_locally(
        pipeline_root=tmp_path / "root",
        images_uri=str(sample.root),
        results_root=str(tmp_path / "results"),
        model=str(model),
        task="quality.clip_iqa:ClipIQA",
        local_nproc=2,
        batch_size=2,
        shard_size=3,
        device="cpu",
    )

    table = pd.read_parquet(run.results_parquet)
    assert list(table.columns) == ["image_id", "quality", "uri"]
    corrupt = str(sample.root / CORRUPT_NAME)
    assert set(table["uri"]) == {str(p) for p in sample.images} - {corrupt}
    assert run.metrics["errors"] == 1 and run.metrics["missing"] == run.metrics["duplicated"] == 0
    # CLIP-IQA is the zero-shot pipeline's score of "Good photo." against "Bad photo.".
    classify = pipeline("zero-shot-image-classification", model=str(model), device="cpu")
    for uri, quality in zip(table["uri"], table["quality"], strict=True):
        scores = {
            r["label"]: r["score"]
            for r in classify(uri, candidate_labels=["Good photo.", "Bad photo."], hypothesis_template="{}")
        }
        assert quality == pytest.approx(scores["Good photo."], abs=1e-4)
    record = json.loads(next((tmp_path / "results").glob("*/run.json")).read_text())
    assert record["task"] == "quality.clip_iqa:ClipIQA"
    assert [c["name"] for c in record["columns"]] == ["image_id", "quality", "uri"]


@pytest.mark.slow
def test_zero_shot_labels_as_a_list_parameter_through_the_pipeline(models, tmp_path):
    sample = make_sample_images(tmp_path / "images", 6)
    labels = ["a cat", "a dog", "a red car", "a tree, in autumn"]

    run = run_pipeline_locally(
        pipeline_root=tmp_path / "root",
        images_uri=str(sample.root),
        results_root=str(tmp_path / "results"),
        model=str(models("siglip")),
        task="zero-shot",
        labels=labels,
        top_k=2,
        local_nproc=1,
        device="cpu",
    )

    table = pd.read_parquet(run.results_parquet)
    assert all(len(top) == 2 and set(top) <= set(labels) for top in table["top_labels"])
    assert (table["classification"] == table["top_labels"].map(lambda top: top[0])).all()
    assert run.metrics["distinct_classes"] == table["classification"].nunique()
    record = json.loads(next((tmp_path / "results").glob("*/run.json")).read_text())
    assert json.loads(record["labels"]) == labels and record["top_k"] == 2
