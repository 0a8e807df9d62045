"""The zero-shot task against transformers' own zero-shot-image-classification pipeline."""

from __future__ import annotations

import json

import pytest

from tests.support.tasks import run_task
from worker.config import ConfigError, WorkerConfig
from worker.tasks.zero_shot import ZeroShot

LABELS = ["cat", "dog", "bird", "red car", "tree", "a house"]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_labels_and_scores_are_the_pipelines(family, models, task_images, tmp_path):
    from transformers import pipeline

    model = models(family)
    k = 3
    got = run_task(task_images, model, tmp_path / "out", task="zero-shot", labels=",".join(LABELS), top_k=k)
    classify = pipeline("zero-shot-image-classification", model=str(model), device="cpu")
    assert len(got) == len(task_images)
    for path in task_images:
        want = classify(str(path), candidate_labels=LABELS)[:k]
        row = got[str(path)]
        assert json.loads(row["top_labels"]) == [w["label"] for w in want], path.name
        assert row["classification"] == want[0]["label"]
        assert json.loads(row["top_label_indices"]) == [LABELS.index(w["label"]) for w in want]
        assert json.loads(row["top_scores"]) == pytest.approx([w["score"] for w in want], abs=1e-4)
        assert float(row["score"]) == pytest.approx(want[0]["score"], abs=1e-4)
    # The model's head decides the scores: SigLIP's are independent sigmoids, CLIP's a softmax.
    total = sum(
        classify(str(task_images[0]), candidate_labels=LABELS)[i]["score"] for i in range(len(LABELS))
    )
    assert (total == pytest.approx(1.0, abs=1e-5)) == (family == "clip")


def test_labels_file_and_prompt(models, task_images, tmp_path):
    from transformers import pipeline

    model = models("clip")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n\n")
    prompt = "a blurry picture of a {}"
    got = run_task(
        task_images, model, tmp_path / "out", task="zero-shot", labels_file=str(labels_file), prompt=prompt
    )
    classify = pipeline("zero-shot-image-classification", model=str(model), device="cpu")
    for path in task_images:
        want = classify(str(path), candidate_labels=LABELS, hypothesis_template=prompt)[0]
        row = got[str(path)]
        assert row["classification"] == want["label"] and "top_labels" not in row
        assert float(row["score"]) == pytest.approx(want["score"], abs=1e-4)


def _cfg(model, **settings) -> WorkerConfig:
    return WorkerConfig(input="/i", output="/o", model=str(model), task="zero-shot", **settings)


@pytest.mark.parametrize(
    "case,settings,message",
    [
        ("an image classifier", {"labels": "a,b"}, "which has no zero-shot image-classification class"),
        ("clip", {"labels": "a,b,a"}, "--labels: labels repeat: a"),
        ("clip", {"labels": " , "}, "--labels: no labels given"),
        ("clip", {"labels_file": "/no/such/labels.txt"}, "--labels-file /no/such/labels.txt: no such file"),
        ("clip", {"labels": '["a", 1]'}, "--labels: a JSON array of strings"),
    ],
)
def test_check_model_says_what_is_wrong_in_one_line(case, settings, message, models, tiny_model):
    model = tiny_model if case == "an image classifier" else models(case)
    with pytest.raises(ConfigError) as caught:
        ZeroShot.check_model(str(model), _cfg(model, **settings))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_check_model_accepts_clip_and_siglip(models):
    for family in ("clip", "siglip"):
        ZeroShot.check_model(str(models(family)), _cfg(models(family), labels='["a cat", "a dog"]'))
