"""The TrainJob kind (Trainer v2.3): runtimeRef, trainer fields, runtimePatches, and no PET_* of its own."""

from __future__ import annotations

import pytest

from components.launch.kubernetes.kinds import JobConfig
from components.launch.kubernetes.trainjob import KIND
from tests.support.job_pods import job_config, training_runtime


def build(**overrides) -> dict:
    return KIND.build(job_config(**overrides))


def test_it_names_the_training_runtime_cluster_installs():
    ref = build()["spec"]["runtimeRef"]
    runtime = training_runtime()
    assert ref == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": runtime["kind"],
        "name": runtime["metadata"]["name"],
    }
    assert runtime["metadata"]["namespace"] == JobConfig(name="x", image="i", worker_args=[]).namespace
    assert "torch" in runtime["spec"]["mlPolicy"]  # Trainer's torch plugin: torchrun's PET_* variables


@pytest.mark.parametrize("nodes, gpus", [(1, 8), (4, 2)])
def test_trainer_carries_the_shape_image_command_env_and_resources(nodes, gpus):
    trainer = build(nodes=nodes, gpus_per_node=gpus, env={"HF_HUB_OFFLINE": "1"})["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (nodes, gpus, "img:1")
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": str(gpus)}
    assert trainer["command"][:2] == ["bash", "-c"] and f"--nnodes={nodes}" in trainer["command"][2]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in trainer["env"]
    # The operator injects PET_* and rejects a TrainJob that sets them.
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]


def test_pod_settings_go_through_one_runtime_patch_of_the_node_job():
    (patch,) = build(gcsfuse_bucket="images")["spec"]["runtimePatches"]
    assert patch["manager"] == "batch-inference.dev/launcher"
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    runtime_jobs = [j["name"] for j in training_runtime()["spec"]["template"]["spec"]["replicatedJobs"]]
    assert job["name"] in runtime_jobs
    pod = job["template"]["spec"]["template"]
    assert set(pod["spec"]) == {"nodeSelector", "tolerations", "volumes", "serviceAccountName", "containers"}
    assert set(pod["metadata"]) == {"annotations"}
    (container,) = pod["spec"]["containers"]
    assert set(container) == {"name", "volumeMounts"}  # the rest of the container is in spec.trainer


def test_the_runtime_fails_fast_and_restarts_the_gang_as_the_job_config_says():
    defaults = JobConfig(name="x", image="i", worker_args=[])
    spec = training_runtime()["spec"]["template"]["spec"]
    assert spec["failurePolicy"]["maxRestarts"] == defaults.backoff_limit
    assert spec["ttlSecondsAfterFinished"] == defaults.ttl_seconds_after_finished
    (job,) = spec["replicatedJobs"]
    assert job["template"]["spec"]["backoffLimit"] == 0
    assert job["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == KIND.container


def test_queued_trainjobs_are_created_suspended_and_deadlines_are_kept():
    spec = build(active_deadline_seconds=36000)["spec"]
    assert spec["suspend"] is True and spec["activeDeadlineSeconds"] == 36000
    assert "suspend" not in build(queue=None)["spec"]


def test_a_pull_policy_the_trainjob_cannot_carry_is_refused():
    with pytest.raises(ValueError, match="image_pull_policy cannot be set on a TrainJob"):
        build(image_pull_policy="Always")
