"""The local harness applies the KFP launcher's artifact rules that kfp.local alone does not.

Each test runs a two-task pipeline of real lightweight components through kfp.local, once
plainly (kfp.local accepts it) and once under ``launcher_rules`` (which must fail it the way a
Kubeflow server would): today's defect was an upload step pointing its output artifact at the
image bucket, and a launch step taking that prefix as an input artifact.
"""
# No "from __future__ import annotations": kfp reads the components' annotations as types.

import warnings

import kfp.local
import pytest
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from pipelines.dev.launcher_rules import MAX_INPUT_ARTIFACT_BYTES, LauncherRules, launcher_rules
from tests.support.helpers import upload_images

BIG = MAX_INPUT_ARTIFACT_BYTES + 1


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def point_at_the_images(images_uri: str, dataset: Output[Dataset]):
    """The old upload step: its output artifact points at the user's image bucket.

    Args:
        images_uri: The images' prefix.
        dataset: Set to the images' prefix.
    """
    dataset.uri = images_uri


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def write_a_big_file(size: int, dataset: Output[Dataset]):
    """An artifact that holds the data itself.

    Args:
        size: Bytes to write.
        dataset: The file.
    """
    with open(dataset.path, "wb") as out:
        out.write(b"\0" * size)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def take_it(dataset: Input[Dataset]) -> str:
    """The old launch step: takes the data as an input artifact.

    Args:
        dataset: The input.

    Returns:
        The artifact's URI.
    """
    return dataset.uri


@dsl.pipeline
def old_style(images_uri: str):
    take_it(dataset=point_at_the_images(images_uri=images_uri).outputs["dataset"])


@dsl.pipeline
def big_input(size: int):
    take_it(dataset=write_a_big_file(size=size).outputs["dataset"])


def _run(pipeline, root, ruled: bool, **arguments):
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not ruled:
            return pipeline(**arguments), None
        with launcher_rules(root) as rules:
            with pytest.raises(RuntimeError):
                pipeline(**arguments)
        return None, rules


def test_an_output_artifact_outside_the_pipeline_root_fails_the_task(tmp_path):
    images = "gs://my-images/coco"
    plain, _ = _run(old_style, tmp_path / "plain", ruled=False, images_uri=images)
    assert plain is not None  # kfp.local alone lets the defect through

    _, rules = _run(old_style, tmp_path / "ruled", ruled=True, images_uri=images)
    [violation] = rules.violations
    assert "point-at-the-images" in violation and "does not have expected bucket prefix" in violation
    assert images in violation


def test_an_input_artifact_over_a_few_mb_fails_the_task(tmp_path):
    plain, _ = _run(big_input, tmp_path / "plain", ruled=False, size=BIG)
    assert plain is not None

    _, rules = _run(big_input, tmp_path / "ruled", ruled=True, size=BIG)
    [violation] = rules.violations
    assert "take-it" in violation and f"{BIG:,} bytes" in violation


def test_a_gcs_prefix_as_input_artifact_counts_what_the_launcher_would_download(gcs):
    bucket = gcs.new_bucket("rules")
    upload_images(gcs.client, bucket, "images", 3)
    rules = LauncherRules("/pipeline-root", max_input_bytes=100)
    executor_input = {
        "inputs": {"artifacts": {"images": {"artifacts": [{"uri": f"gs://{bucket}/images"}]}}},
    }

    [problem] = rules.check_inputs("launch", executor_input)

    assert "launcher downloads it" in problem and f"gs://{bucket}/images" in problem
    assert not LauncherRules("/pipeline-root").check_inputs("launch", executor_input)  # small enough
