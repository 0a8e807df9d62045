"""The JobSet kind (``jobset.x-k8s.io/v1alpha2``, JobSet v0.12), as Google's A3 Ultra examples run torchrun.

One replicated job, ``node``, of one Indexed Job with ``nodes`` pods. JobSet gives every pod a
DNS name through a headless service (``<jobset>-node-0-<i>.<jobset>``); node 0's name is the
rendezvous host, and the pod's completion index (downward API) its node rank, both passed to
torchrun as ``PET_*`` variables. Not ``spec.coordinator``: it copies node 0's name into a label,
which JobSet's webhook refuses beyond 63 bytes, so any JobSet named over 26 characters.
``backoffLimit: 0`` fails the Job at a rank's first failure, ``failurePolicy.maxRestarts``
recreates the whole gang up to ``backoff_limit`` times (the worker resumes from its committed
shards), and ``successPolicy`` ends the JobSet when every pod has finished. Kueue queues it
through its ``jobset.x-k8s.io/jobset`` integration, on by default; one replicated job is one
PodSet, which GKE queued provisioning accepts as it is.
"""

from __future__ import annotations

from typing import Any

from components.launch.kubernetes.api import Resource
from components.launch.kubernetes.kinds import (
    FAILED,
    RUNNING,
    STARTING,
    SUCCEEDED,
    SUSPENDED,
    JobConfig,
    JobState,
    job_object,
    true_conditions,
)
from components.launch.kubernetes.pod import pod_template

JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
NODE_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"  # status.restarts when the pod's Job was made
REPLICATED_JOB = "node"
RENDEZVOUS_PORT = "29500"


def jobset_state(
    job: dict[str, Any], conditions: dict[str, dict[str, Any]], jobs_status: list[dict[str, Any]]
) -> JobState:
    """Suspended, Running (every pod of the node job ready) or Starting, for a JobSet or a TrainJob."""
    if (job.get("spec") or {}).get("suspend") or SUSPENDED in conditions:
        return JobState.of(SUSPENDED, conditions.get(SUSPENDED))
    if any((status.get("ready") or 0) + (status.get("succeeded") or 0) > 0 for status in jobs_status):
        return JobState(RUNNING)
    return JobState(STARTING)


def rendezvous_host(jobset_name: str) -> str:
    """Node 0's DNS name: ``<pod hostname>.<subdomain>``, as JobSet names the pods of its headless service."""
    return f"{jobset_name}-{REPLICATED_JOB}-0-0.{jobset_name}"


def _rendezvous_env(jobset_name: str) -> list[dict[str, Any]]:
    """Torchrun's node rank (the pod's completion index, downward API) and rendezvous host."""
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{NODE_INDEX_LABEL}']"}}
    return [
        {"name": "PET_NODE_RANK", "valueFrom": index},
        {"name": "PET_MASTER_ADDR", "value": rendezvous_host(jobset_name)},
        {"name": "PET_MASTER_PORT", "value": RENDEZVOUS_PORT},
    ]


class JobSetPods:
    """The pods of a JobSet (also of a TrainJob, which Trainer runs as a JobSet): labels and ranks."""

    container = "node"
    leader_rank = f"{REPLICATED_JOB}-0"

    def pod_selector(self, job_name: str) -> str:
        return f"{JOBSET_NAME_LABEL}={job_name}"

    def rank_selector(self, job_name: str, rank: str) -> str:
        return (
            f"{JOBSET_NAME_LABEL}={job_name},{REPLICATED_JOB_LABEL}={REPLICATED_JOB},"
            f"{NODE_INDEX_LABEL}={rank.rpartition('-')[2]}"
        )

    def rank(self, pod: dict[str, Any]) -> str:
        return f"{REPLICATED_JOB}-{(pod['metadata'].get('labels') or {}).get(NODE_INDEX_LABEL, '?')}"

    def restart_attempt(self, pod: dict[str, Any]) -> int | None:
        value = (pod["metadata"].get("labels") or {}).get(RESTART_ATTEMPT_LABEL, "")
        return int(value) if value.isdigit() else None


class JobSetKind(JobSetPods):
    name = "jobset"
    resource = Resource("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet")
    provider = "JobSet (v0.12)"
    kueue_framework = "jobset.x-k8s.io/jobset"

    def build(self, cfg: JobConfig) -> dict[str, Any]:
        """The JobSet manifest: one Indexed Job of ``nodes`` worker pods."""
        cfg.validate()
        pod = pod_template(cfg, self.container, extra_env=_rendezvous_env(cfg.name))
        pod["spec"]["restartPolicy"] = "Never"  # a failed rank fails its Job; the JobSet restarts the gang
        job_spec: dict[str, Any] = {
            "parallelism": cfg.nodes,
            "completions": cfg.nodes,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": pod,
        }
        if cfg.active_deadline_seconds is not None:
            job_spec["activeDeadlineSeconds"] = cfg.active_deadline_seconds
        spec: dict[str, Any] = {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "failurePolicy": {"maxRestarts": cfg.backoff_limit},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec}}],
        }
        if cfg.queue:
            spec["suspend"] = True  # Kueue admits it; until then no pod exists
        if cfg.ttl_seconds_after_finished is not None:
            spec["ttlSecondsAfterFinished"] = cfg.ttl_seconds_after_finished
        return job_object(self.resource, cfg, spec)

    def state(self, job: dict[str, Any]) -> JobState:
        conditions = true_conditions(job)
        if "Completed" in conditions:
            return JobState.of(SUCCEEDED, conditions["Completed"])
        if FAILED in conditions:
            return JobState.of(FAILED, conditions[FAILED])
        return jobset_state(job, conditions, (job.get("status") or {}).get("replicatedJobsStatus") or [])

    def gang_restarts(self, job: dict[str, Any]) -> int | None:
        return int((job.get("status") or {}).get("restarts") or 0)

    def max_restarts(self, job: dict[str, Any]) -> int | None:
        return ((job.get("spec") or {}).get("failurePolicy") or {}).get("maxRestarts")


KIND = JobSetKind()
