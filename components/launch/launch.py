"""launch: run the worker over a run's images, on this machine or as a Kubernetes job on GKE.

This is the logic behind the ``launch_inference`` KFP component and the
``python -m pipelines render-job`` dry run; it knows nothing about KFP. A
``LaunchRequest`` holds the run's parameters exactly as the pipeline passes them
(strings and numbers, with "" and 0 meaning "not set"), and turns them into the
worker's arguments and, for the ``kubernetes`` backend, the job's config and manifest.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from components.check.checks import (
    KUBERNETES,
    LOCAL,
    TASK_PARAMETERS,
    WORKER_DEFAULTS,
    check_settings,
    task_config,
)
from components.launch.kubernetes.kinds import (
    DEFAULT_JOB_KIND,
    JobConfig,
    JobKind,
    default_network_interfaces,
    job_kind,
    job_name_for,
)
from worker.config import WorkerConfig, parse_args
from worker.fingerprint import check_output, prepare_plan
from worker.storage import join


@dataclass(frozen=True)
class LaunchRequest:
    """One run's launch parameters.

    The fields other than ``images_uri`` and ``run_id`` are the ``batch_inference``
    pipeline's parameters of the same names; its docstring describes them.
    """

    images_uri: str
    run_id: str
    results_root: str
    results_prefix: str
    incremental: bool
    overwrite: bool
    model: str
    backend: str
    batch_size: int
    shard_size: int
    device: str
    extra_worker_args: str
    local_nproc: int
    nodes: int
    gpus_per_node: int
    namespace: str
    queue: str
    priority_class: str
    accelerator: str
    max_run_duration_seconds: int
    timeout_seconds: int
    rdma: bool
    rdma_networks: str
    image: str
    service_account: str
    gke_project: str
    gke_location: str
    gke_cluster: str
    job_kind: str = DEFAULT_JOB_KIND
    # The task and its parameters (components.check.checks.task_config's arguments).
    task: str = WORKER_DEFAULTS["task"]
    top_k: int = WORKER_DEFAULTS["top_k"]
    labels: list[str] = field(default_factory=list)
    labels_file: str = WORKER_DEFAULTS["labels_file"]
    prompt: str = WORKER_DEFAULTS["prompt"]
    normalize: bool = WORKER_DEFAULTS["normalize"]
    embedding_dtype: str = WORKER_DEFAULTS["embedding_dtype"]

    @property
    def task_parameters(self) -> dict:
        return {name: getattr(self, name) for name in TASK_PARAMETERS}

    @property
    def results_uri(self) -> str:
        """Where this run's results go: the explicit prefix, else ``<results_root>/<run_id>``.

        An explicit prefix that already holds a plan makes the worker resume it.
        """
        if self.results_prefix:
            return self.results_prefix.rstrip("/")
        return join(self.results_root, self.run_id)

    @property
    def gke(self) -> tuple[str, str, str] | None:
        """(project, location, cluster) when the job goes to a GKE cluster from outside it."""
        given = (self.gke_project, self.gke_location, self.gke_cluster)
        return given if all(given) else None

    def validate(self) -> None:
        """Reject a request that could only fail later, with a message naming the parameter.

        Raises:
            ValueError: The first problem found.
        """
        check_settings(
            images_uri=self.images_uri,
            results_root=self.results_root,
            results_prefix=self.results_prefix,
            model=self.model,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            backend=self.backend,
            image=self.image,
            **self.task_parameters,
        )
        if self.local_nproc < 1:
            raise ValueError(f"local_nproc must be at least 1, got {self.local_nproc}")
        if self.backend == KUBERNETES:
            job_kind(self.job_kind)  # ValueError naming job_kind when it is not a kind
            if any((self.gke_project, self.gke_location, self.gke_cluster)) and not self.gke:
                raise ValueError(
                    "gke_project, gke_location and gke_cluster go together: set all three "
                    "(a launcher outside the cluster) or none (in-cluster credentials)"
                )
        self.worker_args()  # WorkerConfig checks batch size, shard size and device

    def worker_args(self) -> list[str]:
        """The ``python -m worker`` arguments of this run."""
        cfg = WorkerConfig(
            input=self.images_uri,
            output=self.results_uri,
            model=self.model,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            device=self.device,
            incremental=self.incremental,
            overwrite=self.overwrite,
            **task_config(**self.task_parameters),
        )
        # Extra flags go last: argparse keeps the last value, so they can override anything above.
        return cfg.to_args() + shlex.split(self.extra_worker_args)

    @property
    def kind(self) -> JobKind:
        """The Kubernetes job kind that runs the worker (``job_kind``)."""
        return job_kind(self.job_kind)

    def job_manifest(self) -> dict:
        """The manifest of this run's job."""
        return self.kind.build(self.job_config())

    def job_config(self) -> JobConfig:
        """The job config of this run, whatever the job kind."""
        networks = [n.strip() for n in self.rdma_networks.split(",") if n.strip()]
        interfaces = (
            tuple((f"eth{i}", n) for i, n in enumerate(networks))
            if networks
            else default_network_interfaces()
        )
        return JobConfig(
            name=job_name_for(self.run_id, self.results_uri),
            image=self.image,
            worker_args=self.worker_args(),
            namespace=self.namespace,
            nodes=self.nodes,
            gpus_per_node=self.gpus_per_node,
            queue=self.queue or None,
            priority_class=self.priority_class or None,
            accelerator=self.accelerator,
            max_run_duration_seconds=self.max_run_duration_seconds or None,
            rdma=self.rdma,
            network_interfaces=interfaces,
            service_account=self.service_account or None,
            results_uri=self.results_uri,
        )


def _plan_here(req: LaunchRequest, log: Callable[[str], None]) -> int:
    """Plan an incremental run in the launcher, before any job exists, and return its size.

    A nightly run often finds nothing new; planning here lets it skip provisioning GPU nodes
    just to learn that. The worker then finds the plan in place and uses it (the resume path).
    """
    plan = prepare_plan(parse_args(req.worker_args()))
    info = plan.record
    log(
        f"incremental plan: {plan.images} of {info.get('listed', '?')} images under {req.images_uri} are "
        f"new or changed since {info.get('base') or 'no earlier complete run'}"
    )
    return plan.images


@dataclass(frozen=True)
class LaunchResult:
    """What ran.

    ``admitted_at`` to ``ended_at`` is when the run held its GPUs: from the job's first admission
    (on Kubernetes, once DWS provisioned its nodes: ``kueue.Admission``; locally, torchrun's
    start) to its end. Both are None when no job ran or an adopted job's admission is unknown.
    ``held_seconds``: how long it held them, any time evicted and waiting to be readmitted left
    out; None: ``ended_at - admitted_at``.
    """

    backend: str
    results_uri: str
    job_name: str  # "" for the local backend
    nodes: int
    world_size: int
    admitted_at: datetime | None = None
    ended_at: datetime | None = None
    held_seconds: float | None = None


def launch(req: LaunchRequest, *, log: Callable[[str], None] | None = None, api=None) -> LaunchResult:
    """Run the worker for ``req`` and wait until every image has a result or an error row.

    Args:
        req: The run's parameters; validated first.
        log: Receives progress lines (the worker's output locally, the job's events and
            logs on Kubernetes); default: print them.
        api: The Kubernetes API client (``components.launch.kubernetes.api.KubernetesApi``) for
            the kubernetes backend; default: from ``gke_*`` when set, else the pod's service account.

    Returns:
        Where the results are and what ran.

    Raises:
        ValueError: The request is invalid.
        worker.fingerprint.RunMismatch: The results prefix holds results of another run (and
            ``overwrite`` is off); raised before any job exists, so no GPU is provisioned for it.
        components.launch.local.LocalRunError: The local worker failed.
        components.launch.kubernetes.errors.LauncherError: The job failed, was rejected or timed out.
    """
    req.validate()
    check_output(parse_args(req.worker_args()))
    if req.incremental and not _plan_here(req, log or print):
        # Nothing new or changed: no job, no GPUs; the aggregate carries every row over.
        return LaunchResult(req.backend, req.results_uri, "", 0, 0)
    if req.backend == LOCAL:
        from components.launch.local import run_local

        admitted = datetime.now(timezone.utc)
        run_local(req.worker_args(), req.local_nproc, log=log, timeout_s=req.timeout_seconds or None)
        return LaunchResult(
            LOCAL, req.results_uri, "", 1, req.local_nproc, admitted, datetime.now(timezone.utc)
        )

    # Imported here: the local backend (and kfp.local) never needs the Kubernetes client.
    from components.launch.kubernetes.credentials import gke_api, in_cluster_api
    from components.launch.kubernetes.supervisor import run_job

    cfg = req.job_config()
    if api is None:
        api = gke_api(*req.gke) if req.gke else in_cluster_api()
    outcome = run_job(api, req.kind, req.kind.build(cfg), timeout_s=req.timeout_seconds or math.inf, log=log)
    # An adopted job (a retry of this run found its job still running) keeps its own name.
    return LaunchResult(
        KUBERNETES,
        req.results_uri,
        outcome.name,
        cfg.nodes,
        cfg.nodes * cfg.gpus_per_node,
        outcome.admitted_at,
        outcome.ended_at,
        outcome.held_seconds,
    )
