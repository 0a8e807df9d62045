"""The one worker pod every job kind runs: GPUs, DWS scheduling, RDMA + gIB, /dev/shm, gcsfuse, torchrun.

Each check runs on the pods as each kind's controller would create them (for a TrainJob, the
TrainingRuntime of ``cluster/`` merged with the TrainJob's trainer and runtime patches), and the
pod templates are validated against Kubernetes' own strict schemas (``kubernetes-validate``).
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess

import kubernetes_validate
import pytest

from components.launch.kubernetes.kinds import JOB_KINDS, JobConfig, job_kind
from components.launch.kubernetes.pod import failure_status, pod_template
from tests.support.job_pods import RESULTS, job_config, pod_templates, worker_container
from tests.support.schemas import assert_valid_for_kubernetes, pod_template_resource
from worker.config import WorkerConfig

WORKER_ARGS = WorkerConfig(
    input="gs://images/coco val2017", output=RESULTS, model="google/vit-base-patch16-224", batch_size=256
).to_args()
CONFIGS = {
    "one-node": dict(nodes=1),
    "two-nodes": dict(),
    "rdma-off": dict(rdma=False),
    "gcsfuse": dict(gcsfuse_bucket="images-bucket", gcsfuse_mount_path="/data/images"),
    "sixteen-nodes": dict(nodes=16, env={"HF_HUB_OFFLINE": "1"}, labels={"team": "vision"}),
    "no-kueue": dict(
        queue=None, max_run_duration_seconds=None, service_account=None, cpu_request=None, memory_request=None
    ),
}


def config(**overrides) -> JobConfig:
    return job_config(**{"image": "us-docker.pkg.dev/p/r/worker:1", "worker_args": WORKER_ARGS, **overrides})


def pods(kind: str, **overrides) -> list[dict]:
    return pod_templates(job_kind(kind).build(config(**overrides)))


@pytest.fixture(params=JOB_KINDS)
def kind(request) -> str:
    return request.param


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pod_templates_are_valid_for_kubernetes_schemas(kind, name):
    for template in pods(kind, **CONFIGS[name]):
        assert_valid_for_kubernetes(pod_template_resource(template))


def test_kubernetes_schema_check_rejects_an_unknown_pod_field():
    template = pod_template(config(), "pytorch")
    worker_container(template)["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        assert_valid_for_kubernetes(pod_template_resource(template))


def test_every_kind_runs_the_same_pod(kind):
    # Whatever wraps it, the pod is the one builder's, but for the container's name each kind's
    # controller looks for, and the JobSet's rendezvous variables (the other kinds' operators
    # inject their own).
    cfg = config(gcsfuse_bucket="images-bucket", env={"A": "1"}, labels={"team": "vision"})
    reference = pod_template(cfg, job_kind(kind).container)
    for template in pod_templates(job_kind(kind).build(cfg)):
        container, expected = worker_container(template), worker_container(reference)
        own_env = [e for e in container["env"] if not e["name"].startswith("PET_")]
        assert {**container, "env": own_env} == expected
        assert template["metadata"] == reference["metadata"]
        spec = {k: v for k, v in template["spec"].items() if k not in ("containers", "restartPolicy")}
        assert spec == {k: v for k, v in reference["spec"].items() if k != "containers"}


def test_scheduling_targets_queued_h200_nodes(kind):
    for template in pods(kind):
        spec = template["spec"]
        assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert {
            "key": "cloud.google.com/gke-queued",
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        } in spec["tolerations"]
        resources = worker_container(template)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "8"


def test_kueue_labels_stay_off_the_pods(kind):
    # On pods they would make Kueue manage the pods a second time, beside their job.
    for template in pods(kind, priority_class="batch-low"):
        assert not any(k.startswith("kueue.x-k8s.io/") for k in (template["metadata"].get("labels") or {}))


# -- the command ---------------------------------------------------------------------------------------------


def test_command_sources_the_gib_nccl_env_then_execs_torchrun_with_the_worker_args(kind):
    (template, *_) = pods(kind, nodes=2)
    shell, flag, script = worker_container(template)["command"]
    assert (shell, flag) == ("bash", "-c")
    setup, _, run = script.partition(" && ")
    assert setup == "source /usr/local/gib/scripts/set_nccl_env.sh"
    assert shlex.split(run) == [
        "exec",
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--tee=3",  # every line says which process printed it: how the first failing rank is found
        "-m",
        "worker",
        *WORKER_ARGS,
    ]
    assert "args" not in worker_container(template)


def test_command_without_rdma_does_not_touch_gib(kind):
    (template, *_) = pods(kind, rdma=False, nodes=1)
    script = worker_container(template)["command"][2]
    assert "gib" not in script
    assert shlex.split(script)[:5] == ["exec", "torchrun", "--nnodes=1", "--nproc_per_node=8", "--tee=3"]


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
    command = worker_container(pod_template(config(rdma=False, worker_args=awkward), "node"))["command"]

    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
    )

    assert json.loads(result.stdout) == [
        "--nnodes=2",
        "--nproc_per_node=8",
        "--tee=3",
        "-m",
        "worker",
        *awkward,
    ]
    assert not canary.exists()  # nothing in the arguments was run by the shell


def test_the_worker_env_sets_no_torchrun_rendezvous_variable():
    # The kinds own PET_*: Trainer rejects a TrainJob that sets them, the others inject or derive them.
    env = worker_container(pod_template(config(env={"HF_HUB_OFFLINE": "1"}), "node"))["env"]
    assert not [e for e in env if e["name"].startswith("PET_")]
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in env and {
        "name": "HF_HUB_OFFLINE",
        "value": "1",
    } in env


# -- RDMA, shared memory, GCS FUSE, identity -------------------------------------------------------------------


def test_rdma_wiring_is_on_the_pod_template(kind):
    (template, *_) = pods(kind)
    annotations = template["metadata"]["annotations"]
    assert annotations["networking.gke.io/default-interface"] == "eth0"
    assert json.loads(annotations["networking.gke.io/interfaces"]) == (
        [{"interfaceName": "eth0", "network": "default"}, {"interfaceName": "eth1", "network": "gvnic-1"}]
        + [{"interfaceName": f"eth{i + 2}", "network": f"rdma-{i}"} for i in range(8)]
    )
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["gib"]["hostPath"] == {"path": "/home/kubernetes/bin/gib"}
    assert volumes["nvidia"]["hostPath"] == {"path": "/home/kubernetes/bin/nvidia"}
    container = worker_container(template)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["gib"] == "/usr/local/gib" and mounts["nvidia"] == "/usr/local/nvidia"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64:/usr/local/gib/lib64"


def test_network_names_are_configurable():
    networks = (("eth0", "default"), ("eth1", "my-gvnic"), ("eth2", "my-rdma-a"))
    template = pod_template(config(network_interfaces=networks), "node")
    assert json.loads(template["metadata"]["annotations"]["networking.gke.io/interfaces"]) == [
        {"interfaceName": "eth0", "network": "default"},
        {"interfaceName": "eth1", "network": "my-gvnic"},
        {"interfaceName": "eth2", "network": "my-rdma-a"},
    ]


def test_rdma_off_leaves_no_rdma_traces(kind):
    for template in pods(kind, rdma=False):
        assert "networking.gke.io/interfaces" not in (template["metadata"].get("annotations") or {})
        assert {v["name"] for v in template["spec"]["volumes"]} == {"dshm"}
        assert "LD_LIBRARY_PATH" not in {e["name"] for e in worker_container(template)["env"]}


def test_shared_memory_is_an_in_memory_empty_dir(kind):
    for template in pods(kind):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in worker_container(template)["volumeMounts"]


def test_gcsfuse_volume_only_when_a_bucket_is_given(kind):
    (with_fuse, *_) = pods(kind, gcsfuse_bucket="images-bucket")
    assert with_fuse["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    volume = next(v for v in with_fuse["spec"]["volumes"] if "csi" in v)
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"] == {
        "bucketName": "images-bucket",
        "mountOptions": "implicit-dirs,file-cache:max-size-mb:-1",
    }
    assert {"name": volume["name"], "mountPath": "/gcs", "readOnly": True} in worker_container(with_fuse)[
        "volumeMounts"
    ]
    (without, *_) = pods(kind)
    assert "gke-gcsfuse/volumes" not in without["metadata"]["annotations"]
    assert not any("csi" in v for v in without["spec"]["volumes"])


def test_service_account_is_set_on_the_pods(kind):
    for template in pods(kind, service_account="batch-worker"):
        assert template["spec"]["serviceAccountName"] == "batch-worker"


def test_building_does_not_share_state_between_manifests(kind):
    cfg = config(labels={"team": "vision"}, env={"A": "1"})
    first = job_kind(kind).build(cfg)
    pristine = json.loads(json.dumps(first))
    first["metadata"]["labels"]["team"] = "changed"
    for template in pod_templates(first):
        template["metadata"]["labels"]["team"] = "changed"
        worker_container(template)["env"].clear()
    assert job_kind(kind).build(cfg) == pristine
    assert cfg.labels == {"team": "vision"} and cfg.env == {"A": "1"}


def _pod(phase: str, *, state: dict | None = None, last: dict | None = None, **status) -> dict:
    container = {"name": "node", "state": state or {"running": {}}, "lastState": last or {}}
    return {"status": {"phase": phase, "containerStatuses": [container], **status}}


@pytest.mark.parametrize(
    "pod, says",
    [
        (_pod("Running"), ""),
        (_pod("Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed"}}), ""),
        (_pod("Failed", state={"terminated": {"exitCode": 1, "reason": "Error"}}), "exit code 1"),
        (
            _pod("Failed", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
            "exit code 137 (OOMKilled)",
        ),
        (  # FallbackToLogsOnError puts the log's tail in the message: its last line is the error
            _pod(
                "Failed",
                state={"terminated": {"exitCode": 1, "message": "Traceback:\n  ...\nValueError: bad\n"}},
            ),
            "exit code 1: ValueError: bad",
        ),
        (  # restarted in place: the failure is the previous run's
            _pod("Running", last={"terminated": {"exitCode": 139, "reason": "Error"}}),
            "exit code 139",
        ),
        (
            {
                "status": {
                    "phase": "Failed",
                    "reason": "DeadlineExceeded",
                    "message": "Pod was active on the node longer than the specified deadline",
                }
            },
            "DeadlineExceeded: Pod was active on the node longer than the specified deadline",
        ),
    ],
    ids=["running", "succeeded", "error", "oom", "termination-message", "restarted", "deadline"],
)
def test_failure_status_is_what_the_pod_says_of_its_failure(pod, says):
    assert failure_status(pod, "node") == says
