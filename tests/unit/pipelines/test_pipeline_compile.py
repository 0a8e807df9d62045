"""The compiled pipelines: committed YAML is current, and each flavour loads where it must."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.images import DEFAULT_TASK_IMAGE, DEFAULT_WORKER_IMAGE
from components.launch.component import classify_images
from components.launch.launch import LaunchRequest
from pipelines.__main__ import main
from pipelines.batch_inference import KUBEFLOW, PIPELINES, STEPS, VERTEX, compiled_filename
from tests.support import ROOT

COMPILED = ROOT / "compiled"


@pytest.fixture(scope="module")
def template_compile(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A compile through the CLI, in a clean interpreter without image flags or variables."""
    out = tmp_path_factory.mktemp("compiled")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_IMAGE")}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--out", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out, done


@pytest.fixture(scope="module")
def fresh(template_compile) -> Path:
    return template_compile[0]


def test_a_compile_without_images_is_the_template_and_says_so(template_compile):
    _, done = template_compile
    [warning] = done.stderr.splitlines()
    assert warning.startswith("warning: a template") and "--task-image and --image" in warning
    assert (COMPILED / "README.md").read_text().count("template") >= 1


def test_a_compile_with_images_is_the_template_naming_them(fresh, tmp_path, capsys):
    task, worker = "registry.example/tasks:1.0", "registry.example/worker:1.0"
    assert main(["compile", "--out", str(tmp_path), "--task-image", task, "--image", worker]) == 0
    assert "warning" not in capsys.readouterr().err
    for flavour in (KUBEFLOW, VERTEX):
        text = (tmp_path / compiled_filename(flavour)).read_text()
        assert DEFAULT_TASK_IMAGE not in text and DEFAULT_WORKER_IMAGE not in text
        assert text.count(task) == 4  # the four tasks
        placeholders = text.replace(task, DEFAULT_TASK_IMAGE).replace(worker, DEFAULT_WORKER_IMAGE)
        assert placeholders == (fresh / compiled_filename(flavour)).read_text()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--task-image", "registry.example/tasks:1.0"], "--image"),
        (["--image", "registry.example/worker:1.0"], "--task-image"),
        (["--task-image", DEFAULT_TASK_IMAGE, "--image", "registry.example/worker:1.0"], "--task-image"),
        (["--task-image", "registry.example/tasks:1.0", "--image", DEFAULT_WORKER_IMAGE], "--image"),
    ],
)
def test_a_compile_with_a_placeholder_image_is_refused_naming_its_flag(
    flags, named, tmp_path, capsys, monkeypatch
):
    # An image left out falls back to its environment variable: none is set here.
    monkeypatch.setattr("pipelines.submit.TASK_IMAGE", DEFAULT_TASK_IMAGE)
    monkeypatch.setattr("pipelines.submit.WORKER_IMAGE", DEFAULT_WORKER_IMAGE)
    assert main(["compile", "--out", str(tmp_path), *flags]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {named} ghcr.io/example/") and "placeholder" in line
    assert not list(tmp_path.iterdir())


def _docs(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.mark.parametrize("flavour", [KUBEFLOW, VERTEX])
def test_committed_yaml_equals_a_fresh_compile(fresh, flavour):
    name = compiled_filename(flavour)
    assert (COMPILED / name).exists(), f"compiled/{name} is missing: run `python -m pipelines compile`"
    assert (fresh / name).read_bytes() == (COMPILED / name).read_bytes(), (
        f"compiled/{name} is stale: run `python -m pipelines compile` and commit the result"
    )


def test_compile_is_deterministic(fresh, tmp_path):
    from pipelines.batch_inference import compile_pipelines

    for path in compile_pipelines(tmp_path):
        assert path.read_bytes() == (fresh / path.name).read_bytes()


def test_vertex_flavour_is_one_document_without_kfp_kubernetes(fresh):
    text = (fresh / compiled_filename(VERTEX)).read_text()
    docs = _docs(fresh / compiled_filename(VERTEX))
    assert len(docs) == 1  # Vertex AI Pipelines loads templates with a single-document loader
    assert "platforms" not in docs[0] and "platforms:" not in text


def test_kubeflow_flavour_has_the_launcher_pod_settings(fresh):
    spec, platform = _docs(fresh / compiled_filename(KUBEFLOW))
    assert "pipelineInfo" in spec
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    launcher = executors["exec-classify-images"]["podMetadata"]
    assert launcher["labels"]["app.kubernetes.io/component"] == "launch"
    assert launcher["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


@pytest.mark.parametrize("flavour", [KUBEFLOW, VERTEX])
def test_every_parameter_has_a_default_and_a_description(fresh, flavour):
    spec = _docs(fresh / compiled_filename(flavour))[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {
        "source",
        "images_uri",
        "results_root",
        "model",
        "backend",
        "nodes",
        "gpus_per_node",
        "queue",
        "accelerator",
        "max_run_duration_seconds",
        "batch_size",
    } <= set(params)
    for name, param in params.items():
        assert "defaultValue" in param, f"{name} has no default"
        assert param.get("description", "").strip(), f"{name} has no description"
    assert params["model"]["defaultValue"] == "google/vit-base-patch16-224"
    assert params["backend"]["defaultValue"] == "kubernetes"
    assert params["accelerator"]["defaultValue"] == "nvidia-h200-141gb"
    # The job's pods run the CUDA worker image; the tasks themselves the small CPU one.
    assert params["image"]["defaultValue"] == DEFAULT_WORKER_IMAGE != DEFAULT_TASK_IMAGE


@pytest.mark.parametrize("flavour", [KUBEFLOW, VERTEX])
def test_components_run_the_project_image_without_installing_anything(fresh, flavour):
    spec = _docs(fresh / compiled_filename(flavour))[0]
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {
        "exec-check-parameters",
        "exec-upload-images",
        "exec-classify-images",
        "exec-aggregate-results",
    }
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == DEFAULT_TASK_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name


def test_results_prefix_is_unique_per_run(fresh):
    spec = _docs(fresh / compiled_filename(VERTEX))[0]
    run_id = spec["root"]["dag"]["tasks"]["classify-images"]["inputs"]["parameters"]["run_id"]
    assert run_id == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}


def test_launch_component_parameters_are_the_launch_request_fields():
    # The component forwards its parameters to LaunchRequest by name; keep the two in step.
    inputs = set(classify_images.component_spec.inputs)
    fields = {f.name for f in dataclasses.fields(LaunchRequest)}
    assert inputs == fields


def test_both_flavours_take_the_same_parameters():
    kubeflow, vertex = (PIPELINES[f].component_spec.inputs for f in (KUBEFLOW, VERTEX))
    assert kubeflow == vertex


TASKS = {
    "check-parameters": "check",
    "upload-images": "upload",
    "classify-images": "launch",
    "aggregate-results": "aggregate",
}


@pytest.mark.parametrize("flavour", [KUBEFLOW, VERTEX])
def test_each_task_has_its_name_resources_retries_and_caching(fresh, flavour):
    spec = _docs(fresh / compiled_filename(flavour))[0]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(TASKS)
    shown = {task["taskInfo"]["name"] for task in tasks.values()}
    assert shown == {"Check parameters", "Upload images", "Classify images", "Aggregate results"}
    for name, role in TASKS.items():
        task, settings = tasks[name], STEPS[role]
        assert task["taskInfo"]["name"] == settings.display_name
        # Upload may be served from the cache on its inputs; launch and aggregate never.
        assert bool(task.get("cachingOptions", {}).get("enableCache")) == (role == "upload")
        if role in ("check", "launch"):
            # A failed check fails the same way again; a retried launch would start a second job.
            assert "retryPolicy" not in task
        else:
            policy = task["retryPolicy"]
            assert policy["maxRetryCount"] == 3 and policy["backoffFactor"] == 2
            assert policy["backoffDuration"] == "30s" and policy["backoffMaxDuration"] == "600s"
        resources = spec["deploymentSpec"]["executors"][
            task["componentRef"]["name"].replace("comp-", "exec-")
        ]["container"]["resources"]
        assert resources["resourceCpuRequest"] == settings.cpu_request
        assert resources["resourceCpuLimit"] == settings.cpu_limit
        assert resources["resourceMemoryRequest"] == settings.memory_request
        assert resources["resourceMemoryLimit"] == settings.memory_limit


@pytest.mark.parametrize("flavour", [KUBEFLOW, VERTEX])
def test_big_data_passes_by_reference(fresh, flavour):
    # Images and results travel as string parameters; only small files are artifacts.
    tasks = _docs(fresh / compiled_filename(flavour))[0]["root"]["dag"]["tasks"]
    launch, aggregate = tasks["classify-images"]["inputs"], tasks["aggregate-results"]["inputs"]
    assert "artifacts" not in launch
    assert launch["parameters"]["images_uri"]["taskOutputParameter"] == {
        "outputParameterKey": "images_uri",
        "producerTask": "upload-images",
    }
    assert aggregate["parameters"]["results_uri"]["taskOutputParameter"]["producerTask"] == "classify-images"
    assert set(aggregate["artifacts"]) == {"job"}  # the launch step's small JSON record
    # The upload waits for the checks: a bad parameter fails the run before anything is copied.
    assert tasks["upload-images"]["dependentTasks"] == ["check-parameters"]
