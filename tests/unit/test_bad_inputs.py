"""Every entry point refuses a bad input the same way: exit 2, one line naming the parameter,
within seconds, before any model load, upload, job or server call.

The entry points: ``python -m worker``, ``python -m pipelines run --local``, ``render-job``,
``submit``, ``schedule``, and the pipeline's first task (``components/check``). Whatever would
start something is replaced by a stand-in that fails the test, and the model of every case is a
folder whose config.json is broken, so a model check or load that ran too early names --model.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import pipelines.__main__ as pipelines_cli
import worker.__main__ as worker_cli
from components.check.component import check_parameters
from components.images import DEFAULT_TASK_IMAGE, DEFAULT_WORKER_IMAGE
from tests.support import ROOT
from tests.support.helpers import write_images

SECONDS = 5


def _started(*args, **kwargs):
    raise AssertionError("a bad input started something")


@pytest.fixture
def tmp(tmp_path, monkeypatch) -> Path:
    """A folder with images, an empty folder, a regular file and a model that must not load."""
    import pipelines.dev.local_run
    import pipelines.submit
    import worker.run

    write_images(tmp_path / "images", 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{ not json")
    for module, name in (
        (worker.run, "run"),
        (pipelines.dev.local_run, "gcs_emulator"),
        (pipelines.dev.local_run, "run_pipeline_locally"),
        (pipelines.submit, "_kfp_client"),
    ):
        monkeypatch.setattr(module, name, _started)
    # An image left out falls back to its environment variable: none is set here.
    monkeypatch.setattr(pipelines.submit, "TASK_IMAGE", DEFAULT_TASK_IMAGE)
    monkeypatch.setattr(pipelines.submit, "WORKER_IMAGE", DEFAULT_WORKER_IMAGE)
    return tmp_path


WORKER = ["--output", "{tmp}/out", "--model", "{tmp}/model", "--device", "cpu"]
JOB = ["--results-root", "gs://results/runs", "--image", "registry.example/worker:1.0"]
IMAGES = ["--task-image", "registry.example/tasks:1.0", "--image", "registry.example/worker:1.0"]
KFP = ["--kfp-host", "http://127.0.0.1:9", *IMAGES]

CASES = {
    "worker: a gs:// input without a bucket": (["python -m worker", "--input", "gs://", *WORKER], "--input"),
    "worker: an input without images": (["python -m worker", "--input", "{tmp}/empty", *WORKER], "--input"),
    "run --local: results under a regular file": (
        [
            "run",
            "--local",
            "--model",
            "{tmp}/model",
            "--results-root",
            "{tmp}/a-file/x",
            "--workdir",
            "{tmp}/w",
        ],
        "results_root",
    ),
    "run --local: the default model, results under a regular file": (
        ["run", "--local", "--results-root", "{tmp}/a-file/x", "--workdir", "{tmp}/w"],
        "results_root",
    ),
    "run --local: zero-shot without labels": (
        ["run", "--local", "--task", "zero-shot", "--workdir", "{tmp}/w"],
        "labels",
    ),
    "render-job: local images": (["render-job", "--images-uri", "{tmp}/images", *JOB], "images_uri"),
    "render-job: a gs:// images_uri without a bucket": (
        ["render-job", "--images-uri", "gs://", *JOB],
        "images_uri",
    ),
    "render-job: a local model": (
        ["render-job", "--images-uri", "gs://images/coco", *JOB, "--model", "{tmp}/model"],
        "model",
    ),
    "render-job: the placeholder worker image": (
        ["render-job", "--images-uri", "gs://images/coco", *JOB, "--image", DEFAULT_WORKER_IMAGE],
        "--image",
    ),
    "submit: no task image": (
        ["submit", "--kfp-host", "http://127.0.0.1:9", "--images-uri", "gs://images/coco", *JOB],
        "--task-image",
    ),
    "schedule: the placeholder worker image": (
        [
            "schedule",
            *KFP,
            "--cron",
            "0 2 * * *",
            "--images-uri",
            "gs://images/coco",
            *JOB,
            "--image",
            DEFAULT_WORKER_IMAGE,
        ],
        "--image",
    ),
    "submit: the committed template": (
        [
            "submit",
            "--kfp-host",
            "http://127.0.0.1:9",
            "--images-uri",
            "gs://images/coco",
            *JOB,
            "--package",
            str(ROOT / "compiled" / "batch_inference_kubeflow.yaml"),
        ],
        "--package",
    ),
    "submit: local images": (["submit", *KFP, "--images-uri", "{tmp}/images", *JOB], "images_uri"),
    "submit: a local model": (
        ["submit", *KFP, "--images-uri", "gs://images/coco", *JOB, "--model", "{tmp}/model"],
        "model",
    ),
    "schedule: a local model": (
        [
            "schedule",
            *KFP,
            "--cron",
            "0 2 * * *",
            "--images-uri",
            "gs://images/coco",
            *JOB,
            "--model",
            "{tmp}/model",
        ],
        "model",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_naming_it_and_exit_2_before_anything_starts(case, tmp, capsys):
    argv, named = CASES[case]
    argv = [arg.format(tmp=tmp) for arg in argv]
    main = worker_cli.main if argv[0] == "python -m worker" else pipelines_cli.main
    started = time.monotonic()
    code = main(argv[1:] if main is worker_cli.main else argv)
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "error: " in err, err
    assert named in err.split("error: ", 1)[1], err
    assert "apiVersion" not in out  # render-job printed no job
    assert seconds < SECONDS
    assert not (tmp / "out").exists()
    # Nothing slow began: no model found or made, no sample images generated.
    assert not [p.name for p in (tmp / "w").glob("*")], list((tmp / "w").glob("*"))


TASK = {
    "source": "",
    "images_uri": "gs://images/coco",
    "results_root": "gs://results/runs",
    "results_prefix": "",
    "model": "google/vit-base-patch16-224",
    "backend": "kubernetes",
    "image": "registry.example/worker:1.0",
    "batch_size": 256,
    "shard_size": 1024,
    "incremental": False,
    "upload_layout": "loose",
    "packed_shard_mb": 64,
    "packed_shard_images": 0,
    "task": "classification",
    "top_k": 1,
    "labels": [],
    "labels_file": "",
    "prompt": "This is a photo of {}.",
    "normalize": False,
    "embedding_dtype": "float32",
}


@pytest.mark.parametrize(
    "change, named",
    [
        ({"images_uri": "{tmp}/images"}, "images_uri"),
        ({"images_uri": "gs://"}, "images_uri"),
        ({"model": "{tmp}/model"}, "model"),
        ({"backend": "local", "results_root": "{tmp}/a-file/x"}, "results_root"),
        ({"image": DEFAULT_WORKER_IMAGE}, "image"),
        ({"task": "zero-shot"}, "labels"),
        ({"task": "detection"}, "task"),
        ({"task": "no_such_package.tasks:Quality", "backend": "local"}, "task"),
    ],
)
def test_the_pipelines_check_task_refuses_the_same_inputs(change, named, tmp):
    parameters = TASK | {k: v.format(tmp=tmp) for k, v in change.items()}
    with pytest.raises(ValueError) as caught:
        check_parameters.python_func(**parameters)
    message = str(caught.value)
    assert message.startswith(named) and "\n" not in message
