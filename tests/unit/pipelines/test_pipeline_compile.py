"""The compiled pipelines: committed YAML is current, and each flavour loads where it must."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.images import DEFAULT_IMAGE
from components.launch.component import classify_images
from components.launch.launch import LaunchRequest
from pipelines.batch_inference import KUBEFLOW, PIPELINES, VERTEX, compiled_filename
from tests.support import ROOT

COMPILED = ROOT / "compiled"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A compile through the CLI, in a clean interpreter with the default image."""
    out = tmp_path_factory.mktemp("compiled")
    env = {k: v for k, v in os.environ.items() if k != "BATCH_INFERENCE_IMAGE"}
    subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--out", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out


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


@pytest.mark.parametrize("flavour", [KUBEFLOW, VERTEX])
def test_components_run_the_project_image_without_installing_anything(fresh, flavour):
    spec = _docs(fresh / compiled_filename(flavour))[0]
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-upload-images", "exec-classify-images", "exec-aggregate-results"}
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == DEFAULT_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name


def test_results_prefix_is_unique_per_run(fresh):
    spec = _docs(fresh / compiled_filename(VERTEX))[0]
    run_id = spec["root"]["dag"]["tasks"]["classify-images"]["inputs"]["parameters"]["run_id"]
    assert run_id == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}


def test_launch_component_parameters_are_the_launch_request_fields():
    # The component forwards its parameters to LaunchRequest by name; keep the two in step.
    inputs = set(classify_images.component_spec.inputs)
    fields = {f.name for f in dataclasses.fields(LaunchRequest)}
    assert inputs - {"images"} == fields - {"images_uri"}


def test_both_flavours_take_the_same_parameters():
    kubeflow, vertex = (PIPELINES[f].component_spec.inputs for f in (KUBEFLOW, VERTEX))
    assert kubeflow == vertex


@pytest.mark.parametrize("flavour", [KUBEFLOW, VERTEX])
def test_no_task_is_cached(fresh, flavour):
    # Each task depends on GCS state its inputs do not capture; a cache hit would skip real work.
    tasks = _docs(fresh / compiled_filename(flavour))[0]["root"]["dag"]["tasks"]
    assert set(tasks) == {"upload-images", "classify-images", "aggregate-results"}
    assert all(not task.get("cachingOptions", {}).get("enableCache") for task in tasks.values())
