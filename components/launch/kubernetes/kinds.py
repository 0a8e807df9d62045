"""The job-kind seam: what every kind of Kubernetes job the launcher can run has in common.

A job kind (PyTorchJob, TrainJob, JobSet) is one module of this package that defines ``KIND``,
an object following :class:`JobKind`: it wraps the one worker pod
(:func:`components.launch.kubernetes.pod.pod_template`) in its resource and knows that
resource's API coordinates, status conditions, pod labels and main container. The supervisor
(:mod:`components.launch.kubernetes.supervisor`) runs any of them the same way. Adding a kind
is one new module and its name in :data:`JOB_KINDS`.

Also here: :class:`JobConfig`, what varies between the jobs of this pipeline whatever their
kind, the job names, and the Kueue/DWS metadata every kind carries on its own object.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from components.launch.kubernetes.api import Resource

# The job_kind values; each is the name of the module of this package that defines it.
JOB_KINDS = ("pytorchjob", "trainjob", "jobset")
DEFAULT_JOB_KIND = "pytorchjob"

QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
MAX_RUN_DURATION_ANNOTATION = "provreq.kueue.x-k8s.io/maxRunDurationSeconds"
RESULTS_HASH_LABEL = "batch-inference.dev/results-hash"

# ProvisioningRequests for queued provisioning are capped at seven days.
MAX_RUN_DURATION_LIMIT_S = 7 * 24 * 3600

# The phases the supervisor tells apart, whatever the kind calls them.
STARTING, SUSPENDED, RUNNING, RESTARTING, SUCCEEDED, FAILED = (
    "Starting",
    "Suspended",
    "Running",
    "Restarting",
    "Succeeded",
    "Failed",
)
FINISHED = (SUCCEEDED, FAILED)

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME_PREFIX = "bi"
_NAME_HASH_CHARS = 8
# Pods and their DNS names are "<job>-worker-<i>" (PyTorchJob) or "<job>-node-0-<i>" (JobSet,
# TrainJob): both suffixes are 8 characters plus the index, and the result must be a DNS label.
_POD_SUFFIX_CHARS = len("-worker-")
_MAX_JOB_NAME = 63 - _POD_SUFFIX_CHARS - 3
_SLUG_CHARS = 24


def default_network_interfaces() -> tuple[tuple[str, str], ...]:
    """The A3 Ultra interface map: eth0 pod network, eth1 second gVNIC, eth2..eth9 RDMA NICs.

    Returns:
        ``(interface, network)`` pairs; the network names must match the cluster's
        ``Network`` objects.
    """
    return (("eth0", "default"), ("eth1", "gvnic-1")) + tuple((f"eth{i + 2}", f"rdma-{i}") for i in range(8))


@dataclass
class JobConfig:
    """Everything that varies between the jobs of this pipeline, whatever their kind.

    Attributes:
        name: Job name; a DNS-1035 label short enough for the pod names (see :func:`job_name_for`).
        image: Container image holding the ``worker`` package and torchrun.
        worker_args: Arguments for ``python -m worker`` (e.g. ``WorkerConfig.to_args()``).
        namespace: Namespace of the job (and of the LocalQueue).
        nodes: Number of pods, one per node.
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
        backoff_limit: Restarts of the job allowed before it fails (a torchrun gang restarts
            whole: the worker resumes from its committed shards).
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
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = 7 * 24 * 3600
    image_pull_policy: str | None = None

    def validate(self) -> None:
        """Rejects a config the API server, a webhook or DWS would reject later.

        Raises:
            ValueError: Naming the first offending field.
        """
        if not _DNS1035.match(self.name) or len(self.name) > 63:
            raise ValueError(
                f"name {self.name!r} is not a DNS-1035 label "
                "(lowercase letters, digits and '-', starting with a letter, at most 63 chars)"
            )
        longest_pod = len(self.name) + _POD_SUFFIX_CHARS + len(str(max(self.nodes - 1, 0)))
        if longest_pod > 63:
            raise ValueError(
                f"name {self.name!r} is too long: the name of pod {self.nodes - 1} would exceed 63 characters"
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
        for name in self.env:
            if name.startswith("PET_"):
                raise ValueError(
                    f"env {name}: PET_* variables are torchrun's, set by the job kind, not by hand"
                )


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


def job_object(resource: Resource, cfg: JobConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """A job of ``resource``'s kind around ``spec``, with the metadata Kueue and DWS read (``job_metadata``)."""
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": job_metadata(cfg),
        "spec": spec,
    }


def job_metadata(cfg: JobConfig) -> dict[str, Any]:
    """The job object's own metadata: name, namespace, Kueue queue and priority, DWS duration.

    Kueue reads the queue label and copies ``provreq.kueue.x-k8s.io/*`` annotations into the
    ProvisioningRequest only from the job object, never from its pods.
    """
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
    metadata: dict[str, Any] = {"name": cfg.name, "namespace": cfg.namespace, "labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The object's status conditions whose status is True, by type."""
    return {
        c.get("type"): c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


@dataclass(frozen=True)
class JobState:
    """Where a job is, in the supervisor's terms.

    Attributes:
        phase: One of Starting, Suspended, Running, Restarting, Succeeded, Failed.
        reason: The reason of the condition that says so (may be empty).
        message: Its message (may be empty).
    """

    phase: str
    reason: str = ""
    message: str = ""

    @classmethod
    def of(cls, phase: str, condition: dict[str, Any] | None) -> JobState:
        condition = condition or {}
        return cls(phase, condition.get("reason") or "", condition.get("message") or "")

    @property
    def detail(self) -> str:
        """``reason: message``, or whichever of the two is set."""
        return ": ".join(p for p in (self.reason, self.message) if p)


class JobKind(Protocol):
    """One kind of job the launcher can run.

    Attributes:
        name: The ``job_kind`` value (``pytorchjob``).
        resource: Its API group, version, plural and kind.
        container: Name of the worker container in its pods.
        provider: What to install when the API is missing, for the error message.
        kueue_framework: The Kueue integration (``integrations.frameworks`` entry) that queues it.
        leader_rank: ``rank()`` of node 0, torchrun's rendezvous host.
    """

    name: str
    resource: Resource
    container: str
    provider: str
    kueue_framework: str
    leader_rank: str

    def build(self, cfg: JobConfig) -> dict[str, Any]:
        """The manifest of a job of this kind running ``cfg``'s pods (validates ``cfg``)."""
        ...

    def state(self, job: dict[str, Any]) -> JobState:
        """Where the job is, from its spec (suspension) and status conditions."""
        ...

    def pod_selector(self, job_name: str) -> str:
        """Label selector of every pod of the job."""
        ...

    def rank(self, pod: dict[str, Any]) -> str:
        """A short name of the pod's node in the job, e.g. ``master-0`` or ``node-3``."""
        ...

    def rank_selector(self, job_name: str, rank: str) -> str:
        """Label selector of the pods of one node (a restarted node gets a new pod)."""
        ...

    def gang_restarts(self, job: dict[str, Any]) -> int | None:
        """How many times the job restarted its whole gang, as far as the job object tells (0 if
        it does not count them); None: the kind restarts single pods, and its Restarting phase says when.
        """
        ...

    def restart_attempt(self, pod: dict[str, Any]) -> int | None:
        """Which gang restart made the pod (0: the first run); None if its labels do not say."""
        ...

    def max_restarts(self, job: dict[str, Any]) -> int | None:
        """The restarts the job may make before it fails, if the job object says."""
        ...


def node_order(rank: str) -> tuple[int, int]:
    """Sort key of node names: node 0 (``master-0``, ``node-0``) first, then by index."""
    role, _, index = rank.rpartition("-")
    return (0 if role == "master" else 1, int(index) if index.isdigit() else 0)


def job_kind(name: str) -> JobKind:
    """The job kind named ``name`` (imported on first use).

    Raises:
        ValueError: Not one of :data:`JOB_KINDS`.
    """
    if name not in JOB_KINDS:
        raise ValueError(f"job_kind must be one of {', '.join(JOB_KINDS)}, got {name!r}")
    return importlib.import_module(f"{__package__}.{name}").KIND


def render_yaml(manifest: dict[str, Any]) -> str:
    """A manifest as YAML, for ``kubectl apply -f -`` or a run's artifacts."""
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1000)
