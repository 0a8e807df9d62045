"""The PyTorchJob kind (``kubeflow.org/v1``, Kubeflow Training Operator 1.9).

One Master and ``nodes - 1`` Workers, every one the same worker pod. The operator injects
``PET_*`` (torchrun's rendezvous: ``MASTER_ADDR=<job>-master-0``, node rank), restarts failed
pods (``OnFailure``, up to ``backoffLimit``) and deletes them when the job ends
(``cleanPodPolicy: All``). Queued by Kueue's ``kubeflow.org/pytorchjob`` integration, which
Kueue 0.19 turned off by default (see ``cluster/overlays/pytorchjob``). GKE queued
provisioning accepts one PodSet, so Master and Worker get identical templates and Kueue merges
them (``podSetMergePolicy``).
"""

from __future__ import annotations

import copy
from typing import Any

from components.launch.kubernetes.api import Resource
from components.launch.kubernetes.kinds import (
    FAILED,
    RESTARTING,
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

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
RESTART_POLICY = "OnFailure"  # a failed pod restarts in place; backoffLimit bounds it
CLEAN_POD_POLICY = "All"  # nothing keeps GPU nodes busy once the job has ended


class PyTorchJobKind:
    name = "pytorchjob"
    resource = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
    container = "pytorch"  # the operator's webhook rejects a job without this container
    provider = "the Kubeflow Training Operator (v1.9)"
    kueue_framework = "kubeflow.org/pytorchjob"
    leader_rank = "master-0"

    def build(self, cfg: JobConfig) -> dict[str, Any]:
        """The PyTorchJob manifest (Master and Worker templates are deep copies of one pod)."""
        cfg.validate()
        template = pod_template(cfg, self.container)
        replica_specs: dict[str, Any] = {
            "Master": {"replicas": 1, "restartPolicy": RESTART_POLICY, "template": template}
        }
        if cfg.nodes > 1:
            replica_specs["Worker"] = {
                "replicas": cfg.nodes - 1,
                "restartPolicy": RESTART_POLICY,
                "template": copy.deepcopy(template),
            }
        run_policy: dict[str, Any] = {"cleanPodPolicy": CLEAN_POD_POLICY, "backoffLimit": cfg.backoff_limit}
        if cfg.active_deadline_seconds is not None:
            run_policy["activeDeadlineSeconds"] = cfg.active_deadline_seconds
        if cfg.ttl_seconds_after_finished is not None:
            run_policy["ttlSecondsAfterFinished"] = cfg.ttl_seconds_after_finished
        if cfg.queue:
            run_policy["suspend"] = True  # Kueue admits it; until then no pod exists
        spec = {
            "nprocPerNode": str(cfg.gpus_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        }
        return job_object(self.resource, cfg, spec)

    def state(self, job: dict[str, Any]) -> JobState:
        conditions = true_conditions(job)
        for phase in (SUCCEEDED, FAILED):
            if phase in conditions:
                return JobState.of(phase, conditions[phase])
        if ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend") or SUSPENDED in conditions:
            return JobState.of(SUSPENDED, conditions.get(SUSPENDED))
        for phase in (RUNNING, RESTARTING):
            if phase in conditions:
                return JobState.of(phase, conditions[phase])
        return JobState(STARTING)

    def pod_selector(self, job_name: str) -> str:
        return f"{JOB_NAME_LABEL}={job_name}"

    def rank_selector(self, job_name: str, rank: str) -> str:
        replica_type, _, index = rank.rpartition("-")
        return (
            f"{JOB_NAME_LABEL}={job_name},{REPLICA_TYPE_LABEL}={replica_type},{REPLICA_INDEX_LABEL}={index}"
        )

    def rank(self, pod: dict[str, Any]) -> str:
        labels = pod["metadata"].get("labels") or {}
        return f"{labels.get(REPLICA_TYPE_LABEL, '?')}-{labels.get(REPLICA_INDEX_LABEL, '?')}"

    def gang_restarts(self, job: dict[str, Any]) -> int | None:
        return None  # a failed pod restarts alone (OnFailure), under the job's Restarting condition

    def restart_attempt(self, pod: dict[str, Any]) -> int | None:
        return None

    def max_restarts(self, job: dict[str, Any]) -> int | None:
        return ((job.get("spec") or {}).get("runPolicy") or {}).get("backoffLimit")


KIND = PyTorchJobKind()
