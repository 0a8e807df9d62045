"""PyTorchJob manifests: valid for the CRD, for Kubernetes, for the webhook, Kueue, DWS and RDMA.

Two schema sources are used, both offline: the PyTorchJob CRD's ``openAPIV3Schema`` from
``shared/crds`` (with unknown fields rejected, as ``fieldValidation=Strict`` does), and the
upstream Kubernetes JSON schemas shipped by the ``kubernetes-validate`` package for the pod
templates (strict: unknown fields rejected).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components.launch.kubernetes.kinds import (
    MAX_RUN_DURATION_ANNOTATION,
    PRIORITY_CLASS_LABEL,
    QUEUE_NAME_LABEL,
    RESULTS_HASH_LABEL,
    JobConfig,
    job_name_for,
    render_yaml,
    results_hash,
)
from components.launch.kubernetes.pytorchjob import KIND
from tests.support.schemas import (
    CrdValidator,
    assert_valid_for_crd,
    assert_valid_for_kubernetes,
    crd_schema,
    pod_template_resource,
    unknown_fields,
)
from worker.config import WorkerConfig

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RESULTS = "gs://results-bucket/runs/coco-val2017"
WORKER_ARGS = WorkerConfig(
    input="gs://images/coco val2017",
    output=RESULTS,
    model="google/vit-base-patch16-224",
    batch_size=256,
    assignment="dynamic",
).to_args()


def config(**overrides) -> JobConfig:
    values = dict(
        name=job_name_for("run-1", RESULTS),
        image="us-docker.pkg.dev/p/r/worker:1",
        worker_args=WORKER_ARGS,
        results_uri=RESULTS,
    )
    values.update(overrides)
    return JobConfig(**values)


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


@pytest.fixture(params=sorted(CONFIGS))
def manifest(request) -> dict:
    return build_pytorchjob(config(**CONFIGS[request.param]))


build_pytorchjob = KIND.build


def replica_templates(manifest: dict) -> dict[str, dict]:
    return {kind: spec["template"] for kind, spec in manifest["spec"]["pytorchReplicaSpecs"].items()}


def pytorch_container(template: dict) -> dict:
    return next(c for c in template["spec"]["containers"] if c["name"] == "pytorch")


# -- schemas ---------------------------------------------------------------------------------------------


def test_manifest_is_valid_for_the_pytorchjob_crd_schema(manifest, crds_dir):
    assert_valid_for_crd(manifest, crd_schema(crds_dir, "kubeflow.org_pytorchjobs.yaml", "v1"))


def test_crd_check_catches_what_strict_field_validation_rejects(crds_dir):
    schema = crd_schema(crds_dir, "kubeflow.org_pytorchjobs.yaml", "v1")
    typo = build_pytorchjob(config())
    typo["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeselector"] = {"a": "b"}
    wrong_type = build_pytorchjob(config())
    wrong_type["spec"]["runPolicy"]["backoffLimit"] = "3"

    assert unknown_fields(typo, schema) == [".spec.pytorchReplicaSpecs.Master.template.spec.nodeselector"]
    with pytest.raises(jsonschema.ValidationError):
        CrdValidator(schema).validate(wrong_type)


def test_pod_templates_are_valid_for_kubernetes_schemas(manifest):
    for template in replica_templates(manifest).values():
        assert_valid_for_kubernetes(pod_template_resource(template))


def test_kubernetes_schema_check_rejects_an_unknown_pod_field():
    template = replica_templates(build_pytorchjob(config()))["Master"]
    pytorch_container(template)["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        assert_valid_for_kubernetes(pod_template_resource(template))


# -- what the Training Operator's webhook enforces ----------------------------------------------------


def test_webhook_rules_hold(manifest):
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    assert DNS1035.match(manifest["metadata"]["name"]) and len(manifest["metadata"]["name"]) <= 63
    for template in replica_templates(manifest).values():
        assert [c["name"] for c in template["spec"]["containers"]] == ["pytorch"]
        assert pytorch_container(template)["image"]


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_master_and_worker_counts_follow_nodes(nodes):
    replicas = build_pytorchjob(config(nodes=nodes))["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    if nodes == 1:
        assert "Worker" not in replicas
    else:
        assert replicas["Worker"]["replicas"] == nodes - 1


def test_master_and_worker_templates_are_identical_for_one_dws_podset(manifest):
    templates = replica_templates(manifest)
    if "Worker" in templates:
        assert templates["Master"] == templates["Worker"]
        # Deep copies: a later edit to one replica must not silently change the other.
        assert templates["Master"] is not templates["Worker"]
        assert templates["Master"]["spec"] is not templates["Worker"]["spec"]


def test_nproc_per_node_is_a_string_of_the_gpu_count():
    for gpus in (1, 8):
        assert build_pytorchjob(config(gpus_per_node=gpus))["spec"]["nprocPerNode"] == str(gpus)


# -- Kueue and DWS ----------------------------------------------------------------------------------------


def test_kueue_queue_label_and_dws_max_run_annotation_are_on_the_job():
    manifest = build_pytorchjob(config(priority_class="batch-low", max_run_duration_seconds=14400))
    meta = manifest["metadata"]
    assert meta["labels"][QUEUE_NAME_LABEL] == "dws-local-queue"
    assert meta["labels"][PRIORITY_CLASS_LABEL] == "batch-low"
    assert meta["annotations"][MAX_RUN_DURATION_ANNOTATION] == "14400"
    assert meta["labels"][RESULTS_HASH_LABEL] == results_hash(RESULTS) == results_hash(RESULTS + "/")
    for template in replica_templates(manifest).values():
        # Kueue labels belong to the job only; on pods they would make Kueue manage pods twice.
        assert not any(k.startswith("kueue.x-k8s.io/") for k in (template["metadata"].get("labels") or {}))


def test_without_a_queue_no_kueue_label_is_set():
    manifest = build_pytorchjob(config(queue=None, max_run_duration_seconds=None))
    assert QUEUE_NAME_LABEL not in manifest["metadata"]["labels"]
    assert "annotations" not in manifest["metadata"]


def test_scheduling_targets_queued_h200_nodes(manifest):
    for template in replica_templates(manifest).values():
        spec = template["spec"]
        assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert {
            "key": "cloud.google.com/gke-queued",
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        } in spec["tolerations"]
        resources = pytorch_container(template)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "8"


def test_run_policy_defaults():
    spec = build_pytorchjob(config())["spec"]
    assert spec["runPolicy"] == {
        "cleanPodPolicy": "All",
        "backoffLimit": 3,
        "ttlSecondsAfterFinished": 604800,
    }
    assert {r["restartPolicy"] for r in spec["pytorchReplicaSpecs"].values()} == {"OnFailure"}


# -- the command ---------------------------------------------------------------------------------------------


def test_command_sources_the_gib_nccl_env_then_execs_torchrun_with_the_worker_args():
    container = pytorch_container(replica_templates(build_pytorchjob(config(nodes=2)))["Master"])
    shell, flag, script = container["command"]
    assert (shell, flag) == ("bash", "-c")
    setup, _, run = script.partition(" && ")
    assert setup == "source /usr/local/gib/scripts/set_nccl_env.sh"
    assert shlex.split(run) == [
        "exec",
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "-m",
        "worker",
        *WORKER_ARGS,
    ]
    assert "args" not in container


def test_command_without_rdma_does_not_touch_gib():
    container = pytorch_container(replica_templates(build_pytorchjob(config(rdma=False, nodes=1)))["Master"])
    script = container["command"][2]
    assert "gib" not in script
    assert shlex.split(script)[:5] == ["exec", "torchrun", "--nnodes=1", "--nproc_per_node=8", "-m"]


def test_bash_passes_awkward_worker_args_to_torchrun_verbatim(tmp_path):
    # Real bash runs the generated command, with a stand-in torchrun that reports its argv.
    torchrun = tmp_path / "torchrun"
    torchrun.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    torchrun.chmod(torchrun.stat().st_mode | stat.S_IEXEC)
    canary = tmp_path / "injected"
    awkward = [
        "--input",
        'gs://b/it\'s a $HOME "dir"',
        "--output",
        f"gs://b/out; touch {canary}",
        "--model",
        f"m`touch {canary}`$(touch {canary})",
    ]
    command = pytorch_container(
        replica_templates(build_pytorchjob(config(rdma=False, worker_args=awkward)))["Master"]
    )["command"]

    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
    )

    assert json.loads(result.stdout) == ["--nnodes=2", "--nproc_per_node=8", "-m", "worker", *awkward]
    assert not canary.exists()  # nothing in the arguments was run by the shell


# -- RDMA, shared memory, GCS FUSE, identity -------------------------------------------------------------------


def test_rdma_wiring_is_on_the_pod_template():
    template = replica_templates(build_pytorchjob(config()))["Master"]
    annotations = template["metadata"]["annotations"]
    assert annotations["networking.gke.io/default-interface"] == "eth0"
    assert json.loads(annotations["networking.gke.io/interfaces"]) == (
        [{"interfaceName": "eth0", "network": "default"}, {"interfaceName": "eth1", "network": "gvnic-1"}]
        + [{"interfaceName": f"eth{i + 2}", "network": f"rdma-{i}"} for i in range(8)]
    )
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["gib"]["hostPath"] == {"path": "/home/kubernetes/bin/gib"}
    assert volumes["nvidia"]["hostPath"] == {"path": "/home/kubernetes/bin/nvidia"}
    container = pytorch_container(template)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["gib"] == "/usr/local/gib" and mounts["nvidia"] == "/usr/local/nvidia"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64:/usr/local/gib/lib64"


def test_network_names_are_configurable():
    networks = (("eth0", "default"), ("eth1", "my-gvnic"), ("eth2", "my-rdma-a"))
    template = replica_templates(build_pytorchjob(config(network_interfaces=networks)))["Master"]
    assert json.loads(template["metadata"]["annotations"]["networking.gke.io/interfaces"]) == [
        {"interfaceName": "eth0", "network": "default"},
        {"interfaceName": "eth1", "network": "my-gvnic"},
        {"interfaceName": "eth2", "network": "my-rdma-a"},
    ]


def test_rdma_off_leaves_no_rdma_traces():
    template = replica_templates(build_pytorchjob(config(rdma=False)))["Master"]
    assert "networking.gke.io/interfaces" not in (template["metadata"].get("annotations") or {})
    assert {v["name"] for v in template["spec"]["volumes"]} == {"dshm"}
    assert "LD_LIBRARY_PATH" not in {e["name"] for e in pytorch_container(template)["env"]}


def test_shared_memory_is_an_in_memory_empty_dir(manifest):
    for template in replica_templates(manifest).values():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pytorch_container(template)["volumeMounts"]


def test_gcsfuse_volume_only_when_a_bucket_is_given():
    with_fuse = replica_templates(build_pytorchjob(config(gcsfuse_bucket="images-bucket")))["Master"]
    assert with_fuse["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    volume = next(v for v in with_fuse["spec"]["volumes"] if "csi" in v)
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"] == {
        "bucketName": "images-bucket",
        "mountOptions": "implicit-dirs,file-cache:max-size-mb:-1",
    }
    assert {"name": volume["name"], "mountPath": "/gcs", "readOnly": True} in pytorch_container(with_fuse)[
        "volumeMounts"
    ]
    without = replica_templates(build_pytorchjob(config()))["Master"]
    assert "gke-gcsfuse/volumes" not in without["metadata"]["annotations"]
    assert not any("csi" in v for v in without["spec"]["volumes"])


def test_service_account_is_set_on_the_pods():
    template = replica_templates(build_pytorchjob(config(service_account="batch-worker")))["Master"]
    assert template["spec"]["serviceAccountName"] == "batch-worker"


# -- names and validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "results",
    [RESULTS, "gs://B/", "gs://bucket/Runs_2026/ÜBER__long" + "x" * 200, "/tmp/out", "gs://bucket/123"],
)
def test_job_names_are_short_dns_1035_labels(results):
    name = job_name_for("3f2a9c1e-4b5d-4e6f-8a9b-0c1d2e3f4a5b", results)
    assert DNS1035.match(name) and len(name) <= 52, name
    build_pytorchjob(config(name=name, nodes=64))  # room left for "<name>-worker-62"


def test_job_names_are_unique_per_run_and_stable_per_retry():
    assert job_name_for("run-1", RESULTS) == job_name_for("run-1", RESULTS)
    assert job_name_for("run-1", RESULTS) != job_name_for("run-2", RESULTS)
    assert job_name_for("run-1", RESULTS) != job_name_for("run-1", RESULTS + "-b")
    assert job_name_for("run-1", RESULTS).startswith("bi-coco-val2017-")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(nodes=0), "nodes must be at least 1"),
        (dict(gpus_per_node=0), "gpus_per_node must be at least 1"),
        (dict(name="Batch_Job"), "is not a DNS-1035 label"),
        (dict(name="1st-job"), "is not a DNS-1035 label"),
        (dict(name="a" * 60), "would exceed 63 characters"),
        (dict(max_run_duration_seconds=7 * 24 * 3600 + 1), "7 days"),
        (dict(env={"PET_NNODES": "2"}), "PET_* variables are torchrun's"),
        (dict(image=""), "image is required"),
        (dict(namespace="Batch"), "namespace 'Batch' is not a DNS-1123 label"),
        (dict(network_interfaces=(("eth1", "gvnic-1"),)), "must map eth0"),
        (dict(labels={"team": "not a valid value"}), "not a valid label value"),
    ],
)
def test_invalid_configs_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_pytorchjob(config(**overrides))


def test_render_yaml_is_the_manifest():
    manifest = build_pytorchjob(config(gcsfuse_bucket="images-bucket"))
    assert yaml.safe_load(render_yaml(manifest)) == manifest


def test_building_does_not_share_state_between_manifests():
    cfg = config(labels={"team": "vision"}, env={"A": "1"})
    first = build_pytorchjob(cfg)
    pristine = copy.deepcopy(first)
    first["metadata"]["labels"]["team"] = "changed"
    replica_templates(first)["Master"]["metadata"]["labels"]["team"] = "changed"
    assert build_pytorchjob(cfg) == pristine
    assert cfg.labels == {"team": "vision"}
