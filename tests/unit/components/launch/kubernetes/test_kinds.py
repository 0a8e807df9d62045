"""Every job kind's manifest: strictly valid for its real CRD, queued by Kueue with DWS, well named.

The CRD schemas come from the controllers' Go modules (``crds_dir``: PyTorchJob from Training Operator 1.9, TrainJob from
Trainer v2.3.0, JobSet v0.12.0), with unknown fields rejected as ``fieldValidation=Strict`` does.
"""

from __future__ import annotations

import re

import jsonschema
import pytest
import yaml

from components.launch.kubernetes.kinds import (
    JOB_KINDS,
    MAX_RUN_DURATION_ANNOTATION,
    PRIORITY_CLASS_LABEL,
    QUEUE_NAME_LABEL,
    RESULTS_HASH_LABEL,
    job_kind,
    job_name_for,
    render_yaml,
    results_hash,
)
from tests.support.job_pods import RESULTS, job_config
from tests.support.schemas import CrdValidator, assert_valid_for_crd, crd_schema, unknown_fields

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CRDS = {
    "pytorchjob": ("kubeflow.org_pytorchjobs.yaml", "v1"),
    "trainjob": ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
    "jobset": ("jobset.x-k8s.io_jobsets.yaml", "v1alpha2"),
}
WRONG_TYPE = {
    "pytorchjob": ("runPolicy", "backoffLimit"),
    "trainjob": ("trainer", "numNodes"),
    "jobset": ("failurePolicy", "maxRestarts"),
}
CONFIGS = {
    "one-node": dict(nodes=1),
    "two-nodes": dict(),
    "rdma-off": dict(rdma=False),
    "gcsfuse": dict(gcsfuse_bucket="images-bucket", gcsfuse_mount_path="/data/images"),
    "sixteen-nodes": dict(
        nodes=16,
        priority_class="batch-low",
        active_deadline_seconds=36000,
        ttl_seconds_after_finished=600,
        env={"HF_HUB_OFFLINE": "1"},
        labels={"team": "vision"},
    ),
    "no-kueue": dict(
        queue=None, max_run_duration_seconds=None, service_account=None, cpu_request=None, memory_request=None
    ),
}


def schema(crds_dir, kind: str) -> dict:
    return crd_schema(crds_dir, *CRDS[kind])


@pytest.mark.parametrize("kind", JOB_KINDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_manifest_is_valid_for_its_crd(kind, name, crds_dir):
    manifest = job_kind(kind).build(job_config(**CONFIGS[name]))
    assert (manifest["apiVersion"], manifest["kind"]) == (
        job_kind(kind).resource.api_version,
        job_kind(kind).resource.kind,
    )
    assert_valid_for_crd(manifest, schema(crds_dir, kind))


def test_the_crds_cover_exactly_the_registered_kinds():
    assert set(CRDS) == set(JOB_KINDS)


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_crd_check_catches_what_strict_field_validation_rejects(kind, crds_dir):
    manifest = job_kind(kind).build(job_config())
    manifest["spec"]["parallelism"] = 4  # not a field of any of the three
    assert unknown_fields(manifest, schema(crds_dir, kind)) == [".spec.parallelism"]
    manifest = job_kind(kind).build(job_config())
    *path, key = WRONG_TYPE[kind]
    parent = manifest["spec"]
    for part in path:
        parent = parent[part]
    parent[key] = str(parent[key])  # an integer field as a string
    with pytest.raises(jsonschema.ValidationError):
        CrdValidator(schema(crds_dir, kind)).validate(manifest)


# -- Kueue and DWS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_kueue_queue_label_and_dws_max_run_annotation_are_on_the_job_object(kind):
    meta = job_kind(kind).build(job_config(priority_class="batch-low", max_run_duration_seconds=14400))[
        "metadata"
    ]
    assert meta["labels"][QUEUE_NAME_LABEL] == "dws-local-queue"
    assert meta["labels"][PRIORITY_CLASS_LABEL] == "batch-low"
    assert meta["annotations"][MAX_RUN_DURATION_ANNOTATION] == "14400"
    assert meta["labels"][RESULTS_HASH_LABEL] == results_hash(RESULTS) == results_hash(RESULTS + "/")


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_without_a_queue_no_kueue_label_is_set(kind):
    manifest = job_kind(kind).build(job_config(queue=None, max_run_duration_seconds=None))
    assert QUEUE_NAME_LABEL not in manifest["metadata"]["labels"]
    assert "annotations" not in manifest["metadata"]


# -- names, validation, registry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "results",
    [RESULTS, "gs://B/", "gs://bucket/Runs_2026/ÜBER__long" + "x" * 200, "/tmp/out", "gs://bucket/123"],
)
def test_job_names_are_short_dns_1035_labels(results):
    name = job_name_for("3f2a9c1e-4b5d-4e6f-8a9b-0c1d2e3f4a5b", results)
    assert DNS1035.match(name) and len(name) <= 52, name
    for kind in JOB_KINDS:
        job_kind(kind).build(
            job_config(name=name, nodes=64)
        )  # room left for "<name>-worker-62", "<name>-node-0-63"


def test_job_names_are_unique_per_run_and_stable_per_retry():
    assert job_name_for("run-1", RESULTS) == job_name_for("run-1", RESULTS)
    assert job_name_for("run-1", RESULTS) != job_name_for("run-2", RESULTS)
    assert job_name_for("run-1", RESULTS) != job_name_for("run-1", RESULTS + "-b")
    assert job_name_for("run-1", RESULTS).startswith("bi-coco-val2017-")


@pytest.mark.parametrize("kind", JOB_KINDS)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(nodes=0), "nodes must be at least 1"),
        (dict(gpus_per_node=0), "gpus_per_node must be at least 1"),
        (dict(name="Batch_Job"), "is not a DNS-1035 label"),
        (dict(name="1st-job"), "is not a DNS-1035 label"),
        (dict(name="a" * 60), "would exceed 63 characters"),
        (dict(max_run_duration_seconds=7 * 24 * 3600 + 1), "7 days"),
        (dict(backoff_limit=-1), "backoff_limit must be >= 0"),
        (dict(image=""), "image is required"),
        (dict(namespace="Batch"), "namespace 'Batch' is not a DNS-1123 label"),
        (dict(network_interfaces=(("eth1", "gvnic-1"),)), "must map eth0"),
        (dict(labels={"team": "not a valid value"}), "not a valid label value"),
        (dict(env={"PET_NNODES": "2"}), "PET_* variables are torchrun's"),
    ],
)
def test_invalid_configs_are_rejected_with_a_clear_message(kind, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        job_kind(kind).build(job_config(**overrides))


def test_an_unknown_kind_is_named():
    with pytest.raises(
        ValueError, match="job_kind must be one of pytorchjob, trainjob, jobset, got 'mpijob'"
    ):
        job_kind("mpijob")


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_render_yaml_is_the_manifest(kind):
    manifest = job_kind(kind).build(job_config(gcsfuse_bucket="images-bucket"))
    assert yaml.safe_load(render_yaml(manifest)) == manifest
