"""Builds the Kubeflow PyTorchJob that runs ``python -m worker`` on GKE.

The manifest targets Training Operator 1.9 (``kubeflow.org/v1``), is queued by Kueue and
provisioned by GKE's Dynamic Workload Scheduler (flex-start with queued provisioning), and
optionally wires A3 Ultra RDMA networking (gIB NCCL plugin). Everything here is pure: a config
in, a plain ``dict`` out, so the same builder serves the KFP component, the tests and
``kubectl apply`` alike.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the Training Operator's webhook rejects a job without this container

QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
MAX_RUN_DURATION_ANNOTATION = "provreq.kueue.x-k8s.io/maxRunDurationSeconds"
RESULTS_HASH_LABEL = "batch-inference.dev/results-hash"
ACCELERATOR_NODE_LABEL = "cloud.google.com/gke-accelerator"
GPU_RESOURCE = "nvidia.com/gpu"

DEFAULT_INTERFACE_ANNOTATION = "networking.gke.io/default-interface"
INTERFACES_ANNOTATION = "networking.gke.io/interfaces"
GCSFUSE_ANNOTATION = "gke-gcsfuse/volumes"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"

GIB_HOST_PATH = "/home/kubernetes/bin/gib"
GIB_MOUNT_PATH = "/usr/local/gib"
NVIDIA_HOST_PATH = "/home/kubernetes/bin/nvidia"
NVIDIA_MOUNT_PATH = "/usr/local/nvidia"
NCCL_ENV_SCRIPT = f"{GIB_MOUNT_PATH}/scripts/set_nccl_env.sh"
RDMA_LD_LIBRARY_PATH = f"{NVIDIA_MOUNT_PATH}/lib64:{GIB_MOUNT_PATH}/lib64"

# ProvisioningRequests for queued provisioning are capped at seven days.
MAX_RUN_DURATION_LIMIT_S = 7 * 24 * 3600
RESTART_POLICIES = ("OnFailure", "ExitCode", "Never")
CLEAN_POD_POLICIES = ("All", "Running", "None")

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME_PREFIX = "bi"
_NAME_HASH_CHARS = 8
# Replica pods and their headless services are named "<job>-worker-<i>" and must themselves be
# DNS labels, so the job name leaves room for the longest suffix this builder can produce.
_MAX_JOB_NAME = 63 - len("-worker-") - 3
_SLUG_CHARS = 24


def default_network_interfaces() -> tuple[tuple[str, str], ...]:
    """The A3 Ultra interface map: eth0 pod network, eth1 second gVNIC, eth2..eth9 RDMA NICs.

    Returns:
        ``(interface, network)`` pairs; the network names must match the cluster's
        ``Network`` objects.
    """
    return (("eth0", "default"), ("eth1", "gvnic-1")) + tuple((f"eth{i + 2}", f"rdma-{i}") for i in range(8))


@dataclass
class PyTorchJobConfig:
    """Everything that varies between PyTorchJobs of this pipeline.

    Attributes:
        name: Job name; a DNS-1035 label short enough for the replica names
            (see :func:`job_name_for`).
        image: Container image holding the ``worker`` package and torchrun.
        worker_args: Arguments for ``python -m worker`` (e.g. ``WorkerConfig.to_args()``).
        namespace: Namespace of the job (and of the LocalQueue).
        nodes: Number of pods, one per node: one Master plus ``nodes - 1`` Workers.
        gpus_per_node: GPUs requested by each pod and torchrun processes per pod.
        queue: Kueue LocalQueue name; ``None`` submits the job without Kueue.
        accelerator: Value of the ``cloud.google.com/gke-accelerator`` node label.
        max_run_duration_seconds: DWS ``maxRunDurationSeconds`` (at most 7 days); ``None`` omits it.
        priority_class: Kueue WorkloadPriorityClass name, if any.
        rdma: Attach the A3 Ultra RDMA NICs and load the gIB NCCL plugin.
        network_interfaces: ``(interface, network)`` pairs for the multi-network annotation.
        gcsfuse_bucket: Bucket to mount with the GCS FUSE CSI driver, if any.
        gcsfuse_mount_path: Where the bucket appears in the container.
        gcsfuse_mount_options: Comma-separated gcsfuse mount options.
        gcsfuse_read_only: Mount the bucket read-only (results go through the GCS client).
        service_account: Kubernetes service account of the pods (Workload Identity for GCS).
        cpu_request: CPU request per pod.
        memory_request: Memory request per pod.
        shm_size: Size limit of the in-memory ``/dev/shm``.
        env: Extra environment variables for the container.
        labels: Extra labels on the job and its pods.
        annotations: Extra annotations on the job.
        results_uri: Results prefix of the run; its hash labels the job so that a rerun adopts it.
        restart_policy: Replica restart policy: OnFailure, ExitCode or Never.
        clean_pod_policy: Which pods the operator deletes when the job ends.
        backoff_limit: Pod restarts allowed before the job fails.
        active_deadline_seconds: Hard limit on the job's running time, if any.
        ttl_seconds_after_finished: Seconds a finished job is kept for inspection, if set.
        image_pull_policy: Container image pull policy, if set.
    """

    name: str
    image: str
    worker_args: list[str]
    namespace: str = "batch-inference"
    nodes: int = 2
    gpus_per_node: int = 8
    queue: str | None = "dws-local-queue"
    accelerator: str = "nvidia-h200-141gb"
    max_run_duration_seconds: int | None = 7200
    priority_class: str | None = None
    rdma: bool = True
    network_interfaces: tuple[tuple[str, str], ...] = field(default_factory=default_network_interfaces)
    gcsfuse_bucket: str | None = None
    gcsfuse_mount_path: str = "/gcs"
    gcsfuse_mount_options: str = "implicit-dirs,file-cache:max-size-mb:-1"
    gcsfuse_read_only: bool = True
    service_account: str | None = "batch-inference-worker"
    cpu_request: str | None = "96"
    memory_request: str | None = "1024Gi"
    shm_size: str = "256Gi"
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    results_uri: str | None = None
    restart_policy: str = "OnFailure"
    clean_pod_policy: str = "All"
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = 7 * 24 * 3600
    image_pull_policy: str | None = None

    def validate(self) -> None:
        """Rejects a config the API server, the webhook or DWS would reject later.

        Raises:
            ValueError: Naming the first offending field.
        """
        if not _DNS1035.match(self.name) or len(self.name) > 63:
            raise ValueError(
                f"name {self.name!r} is not a DNS-1035 label "
                "(lowercase letters, digits and '-', starting with a letter, at most 63 chars)"
            )
        longest_replica = f"{self.name}-worker-{max(self.nodes - 2, 0)}"
        if len(longest_replica) > 63:
            raise ValueError(
                f"name {self.name!r} is too long: replica name {longest_replica!r} would exceed 63 characters"
            )
        if not _DNS1123_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise ValueError(f"namespace {self.namespace!r} is not a DNS-1123 label")
        if not self.image:
            raise ValueError("image is required")
        if self.nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be at least 1, got {self.gpus_per_node}")
        if self.max_run_duration_seconds is not None and not (
            0 < self.max_run_duration_seconds <= MAX_RUN_DURATION_LIMIT_S
        ):
            raise ValueError(
                f"max_run_duration_seconds must be between 1 and {MAX_RUN_DURATION_LIMIT_S} "
                f"(7 days), got {self.max_run_duration_seconds}"
            )
        if self.restart_policy not in RESTART_POLICIES:
            raise ValueError(
                f"restart_policy must be one of {', '.join(RESTART_POLICIES)}, got {self.restart_policy!r}"
            )
        if self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise ValueError(
                f"clean_pod_policy must be one of {', '.join(CLEAN_POD_POLICIES)}, "
                f"got {self.clean_pod_policy!r}"
            )
        if self.backoff_limit < 0:
            raise ValueError(f"backoff_limit must be >= 0, got {self.backoff_limit}")
        for what, value in (
            ("active_deadline_seconds", self.active_deadline_seconds),
            ("ttl_seconds_after_finished", self.ttl_seconds_after_finished),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{what} must be >= 0, got {value}")
        if self.queue is not None and not self.queue:
            raise ValueError("queue must be a LocalQueue name or None, not empty")
        if self.rdma:
            interfaces = [iface for iface, _ in self.network_interfaces]
            if "eth0" not in interfaces:
                raise ValueError("network_interfaces must map eth0 (the default interface)")
            if len(set(interfaces)) != len(interfaces):
                raise ValueError(f"network_interfaces has a duplicate interface: {interfaces}")
        if self.gcsfuse_bucket is not None and not self.gcsfuse_bucket:
            raise ValueError("gcsfuse_bucket must be a bucket name or None, not empty")
        if self.gcsfuse_bucket and not self.gcsfuse_mount_path.startswith("/"):
            raise ValueError(f"gcsfuse_mount_path must be absolute, got {self.gcsfuse_mount_path!r}")
        for key, value in self.labels.items():
            if not _LABEL_VALUE.match(value) or len(value) > 63:
                raise ValueError(f"label {key}={value!r}: the value is not a valid label value")
        if not all(isinstance(arg, str) for arg in self.worker_args):
            raise ValueError("worker_args must all be strings")


def results_hash(results_uri: str) -> str:
    """A stable, label-safe fingerprint of a results prefix.

    Trailing slashes are ignored so that ``gs://b/out`` and ``gs://b/out/`` name the same run
    output.

    Args:
        results_uri: The results prefix (``gs://bucket/prefix`` or a path).

    Returns:
        16 lowercase hex characters.
    """
    return hashlib.sha256(results_uri.rstrip("/").encode()).hexdigest()[:16]


def job_name_for(run_id: str, results_uri: str) -> str:
    """A job name that is a DNS-1035 label, unique per run and readable.

    The readable part comes from the last segment of the results prefix; the hash covers both
    the run id and the prefix so that two runs never collide while a retry of the same run
    (same id) gets the same name.

    Args:
        run_id: The pipeline run id (e.g. a KFP run UUID).
        results_uri: The results prefix of the run.

    Returns:
        ``bi-<slug>-<8 hex>``, at most 52 characters.
    """
    digest = hashlib.sha256(f"{run_id}\0{results_uri.rstrip('/')}".encode()).hexdigest()[:_NAME_HASH_CHARS]
    segment = results_uri.rstrip("/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^a-z0-9]+", "-", segment.lower()).strip("-")[:_SLUG_CHARS].strip("-")
    name = f"{_NAME_PREFIX}-{slug}-{digest}" if slug else f"{_NAME_PREFIX}-{digest}"
    assert len(name) <= _MAX_JOB_NAME and _DNS1035.match(name), name
    return name


def torchrun_command(cfg: PyTorchJobConfig) -> list[str]:
    """The container command: optional gIB NCCL setup, then torchrun running the worker.

    Node rank and the rendezvous address come from the ``PET_*`` variables that the Training
    Operator injects, which torchrun reads itself; only the shape is passed explicitly.

    Args:
        cfg: The job config.

    Returns:
        ``["bash", "-c", script]``.
    """
    torchrun = shlex.join(
        [
            "torchrun",
            f"--nnodes={cfg.nodes}",
            f"--nproc_per_node={cfg.gpus_per_node}",
            "-m",
            "worker",
            *cfg.worker_args,
        ]
    )
    script = f"exec {torchrun}"
    if cfg.rdma:
        # set_nccl_env.sh exports the gIB tuning (NCCL_NET=gIB, ...) into this shell, so it must be
        # sourced, not run. exec replaces bash with torchrun, which then gets SIGTERM directly when
        # the pod is deleted and can stop its ranks cleanly.
        script = f"source {NCCL_ENV_SCRIPT} && {script}"
    return ["bash", "-c", script]


def _pod_template(cfg: PyTorchJobConfig) -> dict[str, Any]:
    annotations: dict[str, str] = {}
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # so the launcher streams lines as they happen
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if cfg.rdma:
        annotations[DEFAULT_INTERFACE_ANNOTATION] = "eth0"
        annotations[INTERFACES_ANNOTATION] = json.dumps(
            [{"interfaceName": iface, "network": network} for iface, network in cfg.network_interfaces]
        )
        volumes += [
            {"name": "gib", "hostPath": {"path": GIB_HOST_PATH}},
            {"name": "nvidia", "hostPath": {"path": NVIDIA_HOST_PATH}},
        ]
        mounts += [
            {"name": "gib", "mountPath": GIB_MOUNT_PATH},
            {"name": "nvidia", "mountPath": NVIDIA_MOUNT_PATH},
        ]
        env.append({"name": "LD_LIBRARY_PATH", "value": RDMA_LD_LIBRARY_PATH})
    if cfg.gcsfuse_bucket:
        annotations[GCSFUSE_ANNOTATION] = "true"
        volumes.append(
            {
                "name": "gcsfuse",
                "csi": {
                    "driver": GCSFUSE_DRIVER,
                    "readOnly": cfg.gcsfuse_read_only,
                    "volumeAttributes": {
                        "bucketName": cfg.gcsfuse_bucket,
                        "mountOptions": cfg.gcsfuse_mount_options,
                    },
                },
            }
        )
        mounts.append(
            {"name": "gcsfuse", "mountPath": cfg.gcsfuse_mount_path, "readOnly": cfg.gcsfuse_read_only}
        )
    env += [{"name": k, "value": v} for k, v in sorted(cfg.env.items())]

    requests: dict[str, str] = {GPU_RESOURCE: str(cfg.gpus_per_node)}
    if cfg.cpu_request:
        requests["cpu"] = cfg.cpu_request
    if cfg.memory_request:
        requests["memory"] = cfg.memory_request
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": cfg.image,
        "command": torchrun_command(cfg),
        "env": env,
        "resources": {"requests": requests, "limits": {GPU_RESOURCE: str(cfg.gpus_per_node)}},
        "volumeMounts": mounts,
    }
    if cfg.image_pull_policy:
        container["imagePullPolicy"] = cfg.image_pull_policy

    spec: dict[str, Any] = {
        "nodeSelector": {ACCELERATOR_NODE_LABEL: cfg.accelerator},
        "tolerations": [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
            # Nodes created by queued provisioning carry this taint so that only admitted pods land.
            {
                "key": "cloud.google.com/gke-queued",
                "operator": "Equal",
                "value": "true",
                "effect": "NoSchedule",
            },
        ],
        "containers": [container],
        "volumes": volumes,
    }
    if cfg.service_account:
        spec["serviceAccountName"] = cfg.service_account
    metadata: dict[str, Any] = {}
    if cfg.labels:
        metadata["labels"] = dict(cfg.labels)
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


def build_pytorchjob(cfg: PyTorchJobConfig) -> dict[str, Any]:
    """Builds the PyTorchJob manifest.

    Master and Worker get identical pod templates (deep copies): GKE queued provisioning accepts
    a single PodSet, which Kueue can only produce by merging PodSets whose scheduling
    requirements are identical.

    Args:
        cfg: The job config; validated first.

    Returns:
        The manifest as a plain dict, ready for the API server or ``yaml.safe_dump``.

    Raises:
        ValueError: The config is invalid (see :meth:`PyTorchJobConfig.validate`).
    """
    cfg.validate()
    labels = dict(cfg.labels)
    if cfg.queue:
        labels[QUEUE_NAME_LABEL] = cfg.queue
    if cfg.priority_class:
        labels[PRIORITY_CLASS_LABEL] = cfg.priority_class
    if cfg.results_uri:
        labels[RESULTS_HASH_LABEL] = results_hash(cfg.results_uri)
    annotations = dict(cfg.annotations)
    if cfg.max_run_duration_seconds is not None:
        annotations[MAX_RUN_DURATION_ANNOTATION] = str(cfg.max_run_duration_seconds)

    template = _pod_template(cfg)
    replica_specs: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": cfg.restart_policy, "template": template},
    }
    if cfg.nodes > 1:
        replica_specs["Worker"] = {
            "replicas": cfg.nodes - 1,
            "restartPolicy": cfg.restart_policy,
            "template": copy.deepcopy(template),
        }

    run_policy: dict[str, Any] = {"cleanPodPolicy": cfg.clean_pod_policy, "backoffLimit": cfg.backoff_limit}
    if cfg.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = cfg.active_deadline_seconds
    if cfg.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = cfg.ttl_seconds_after_finished

    metadata: dict[str, Any] = {"name": cfg.name, "namespace": cfg.namespace, "labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(cfg.gpus_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def render_yaml(cfg: PyTorchJobConfig) -> str:
    """The manifest as YAML, for ``kubectl apply -f -`` or a run's artifacts.

    Args:
        cfg: The job config.

    Returns:
        One YAML document.
    """
    return yaml.safe_dump(build_pytorchjob(cfg), sort_keys=False, default_flow_style=False, width=1000)
