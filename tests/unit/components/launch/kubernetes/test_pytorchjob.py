"""The PyTorchJob kind: what the Training Operator's webhook enforces, its replicas and run policy."""

from __future__ import annotations

import re

import pytest

from components.launch.kubernetes.pytorchjob import KIND
from tests.support.job_pods import job_config

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def build(**overrides) -> dict:
    return KIND.build(job_config(**overrides))


def templates(manifest: dict) -> dict[str, dict]:
    return {kind: spec["template"] for kind, spec in manifest["spec"]["pytorchReplicaSpecs"].items()}


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_webhook_rules_hold(nodes):
    manifest = build(nodes=nodes)
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    assert DNS1035.match(manifest["metadata"]["name"]) and len(manifest["metadata"]["name"]) <= 63
    for template in templates(manifest).values():
        assert [c["name"] for c in template["spec"]["containers"]] == ["pytorch"]
        assert template["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_master_and_worker_counts_follow_nodes(nodes):
    replicas = build(nodes=nodes)["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    if nodes == 1:
        assert "Worker" not in replicas
    else:
        assert replicas["Worker"]["replicas"] == nodes - 1


def test_master_and_worker_templates_are_identical_for_one_dws_podset():
    found = templates(build(nodes=4))
    assert found["Master"] == found["Worker"]
    # Deep copies: a later edit to one replica must not silently change the other.
    assert found["Master"] is not found["Worker"] and found["Master"]["spec"] is not found["Worker"]["spec"]


def test_nproc_per_node_is_a_string_of_the_gpu_count():
    for gpus in (1, 8):
        assert build(gpus_per_node=gpus)["spec"]["nprocPerNode"] == str(gpus)


def test_run_policy_defaults_and_kueue_suspension():
    spec = build()["spec"]
    assert spec["runPolicy"] == {
        "cleanPodPolicy": "All",
        "backoffLimit": 3,
        "ttlSecondsAfterFinished": 604800,
        "suspend": True,  # queued: created suspended, Kueue unsuspends it on admission
    }
    assert {r["restartPolicy"] for r in spec["pytorchReplicaSpecs"].values()} == {"OnFailure"}
    assert "suspend" not in build(queue=None)["spec"]["runPolicy"]
