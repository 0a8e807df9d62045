"""The JobSet kind: one Indexed Job of N pods, headless-service rendezvous, gang failure and success."""

from __future__ import annotations

import pytest

from components.launch.kubernetes.jobset import KIND
from tests.support.job_pods import job_config
from tests.support.schemas import assert_valid_for_kubernetes


def build(**overrides) -> dict:
    return KIND.build(job_config(**overrides))


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_one_replicated_job_of_one_indexed_job_with_a_pod_per_node(nodes):
    (replicated,) = build(nodes=nodes)["spec"]["replicatedJobs"]
    assert (replicated["name"], replicated["replicas"]) == ("node", 1)  # one PodSet for DWS
    job = replicated["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (nodes, nodes, "Indexed")


def test_the_job_template_is_a_valid_batch_job():
    (replicated,) = build(active_deadline_seconds=3600)["spec"]["replicatedJobs"]
    assert_valid_for_kubernetes(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "node"},
            "spec": replicated["template"]["spec"],
        }
    )


def test_a_failed_rank_fails_the_gang_which_restarts_whole_and_a_finished_gang_ends_the_jobset():
    spec = build(backoff_limit=2)["spec"]
    job = spec["replicatedJobs"][0]["template"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["failurePolicy"] == {"maxRestarts": 2}
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["node"]}
    assert spec["ttlSecondsAfterFinished"] == 604800


def test_torchrun_rendezvous_comes_from_the_headless_service_and_the_completion_index():
    spec = build()["spec"]
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    # Not spec.coordinator: its label holds node 0's DNS name and is limited to 63 bytes.
    assert "coordinator" not in spec
    (container,) = spec["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PET_NODE_RANK"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    name = build()["metadata"]["name"]
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}"  # node 0 on the headless service
    assert env["PET_MASTER_PORT"]["value"].isdigit()
    assert {"PET_NNODES", "PET_NPROC_PER_NODE"}.isdisjoint(env)  # the command passes the shape itself


def test_queued_jobsets_are_created_suspended():
    assert build()["spec"]["suspend"] is True
    assert "suspend" not in build(queue=None)["spec"]
