"""What each job kind's controller does to its objects, as the Kubernetes stand-in plays it.

One class per kind: the Training Operator (PyTorchJob), Kubeflow Trainer (TrainJob, run as a
JobSet of the same name) and the JobSet controller. Each knows its API coordinates, how its job
is suspended and resumed, which conditions mean running, succeeded and failed, and how its
pods are named and labelled. These are written from the controllers' documented behaviour, not
from the product's code, so that the launcher is checked against them rather than against itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

SetCondition = Callable[[dict[str, Any], str, str, str, str], None]


class PyTorchJobController:
    name = "pytorchjob"
    group, version, plural, kind = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
    container = "pytorch"
    job_label = "training.kubeflow.org/job-name"

    def created(self, job: dict[str, Any], set_condition: SetCondition) -> None:
        name = job["metadata"]["name"]
        set_condition(job, "Created", "True", "PyTorchJobCreated", f"PyTorchJob {name} is created.")

    def is_suspended(self, job: dict[str, Any]) -> bool:
        return bool(job["spec"].get("runPolicy", {}).get("suspend"))

    def suspend(self, job: dict[str, Any], set_condition: SetCondition) -> None:
        job["spec"].setdefault("runPolicy", {})["suspend"] = True
        set_condition(job, "Running", "False", "PyTorchJobSuspended", "PyTorchJob is suspended.")
        set_condition(job, "Suspended", "True", "PyTorchJobSuspended", "PyTorchJob is suspended.")

    def run(self, job: dict[str, Any], set_condition: SetCondition, now: str) -> None:
        job["spec"].setdefault("runPolicy", {})["suspend"] = False
        conditions = {c["type"] for c in job["status"].get("conditions", [])}
        if "Suspended" in conditions:
            set_condition(job, "Suspended", "False", "PyTorchJobResumed", "PyTorchJob is resumed.")
        if "Restarting" in conditions:  # the operator keeps one of Running and Restarting true
            set_condition(job, "Restarting", "False", "PyTorchJobRunning", "PyTorchJob is running.")
        set_condition(job, "Running", "True", "PyTorchJobRunning", "PyTorchJob is running.")
        job["status"].setdefault("startTime", now)

    def end(
        self, job: dict[str, Any], succeeded: bool, set_condition: SetCondition, now: str
    ) -> tuple[str, str]:
        name = job["metadata"]["name"]
        if succeeded:
            reason, message = "PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed."
        else:
            reason, message = (
                "PyTorchJobFailed",
                f"PyTorchJob {name} is failed because 1 Worker replica(s) failed.",
            )
        set_condition(job, "Running", "False", reason, message)
        set_condition(job, "Succeeded" if succeeded else "Failed", "True", reason, message)
        job["status"]["completionTime"] = now
        return reason, message

    def pod(
        self, job: str, node: int, attempt: int, restarts: int
    ) -> tuple[str, dict[str, str], dict[str, str]]:
        """Name, labels and annotations of node ``node``'s pod: the Master is node 0."""
        replica_type, index = ("master", 0) if node == 0 else ("worker", node - 1)
        labels = {
            self.job_label: job,
            "training.kubeflow.org/replica-type": replica_type,
            "training.kubeflow.org/replica-index": str(index),
            "training.kubeflow.org/operator-name": "pytorchjob-controller",
        }
        return f"{job}-{replica_type}-{index}", labels, {}


class JobSetController:
    name = "jobset"
    group, version, plural, kind = "jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet"
    container = "node"
    job_label = "jobset.sigs.k8s.io/jobset-name"
    status_field = "replicatedJobsStatus"
    success_condition = "Completed"

    def created(self, job: dict[str, Any], set_condition: SetCondition) -> None:
        job["status"].setdefault("restarts", 0)

    def is_suspended(self, job: dict[str, Any]) -> bool:
        return bool(job["spec"].get("suspend"))

    def suspend(self, job: dict[str, Any], set_condition: SetCondition) -> None:
        job["spec"]["suspend"] = True
        job["status"][self.status_field] = [self._jobs_status(suspended=1)]
        set_condition(job, "Suspended", "True", "SuspendedJobs", f"{self.kind} is suspended")

    def run(self, job: dict[str, Any], set_condition: SetCondition, now: str) -> None:
        job["spec"]["suspend"] = False
        if any(c["type"] == "Suspended" for c in job["status"].get("conditions", [])):
            set_condition(job, "Suspended", "False", "ResumeJobs", f"{self.kind} is resumed")
        job["status"][self.status_field] = [self._jobs_status(ready=1, active=1)]

    def end(
        self, job: dict[str, Any], succeeded: bool, set_condition: SetCondition, now: str
    ) -> tuple[str, str]:
        if succeeded:
            kind, reason, message = (
                self.success_condition,
                "AllJobsCompleted",
                "jobset completed successfully",
            )
            job["status"][self.status_field] = [self._jobs_status(succeeded=1)]
        else:
            kind, reason, message = (
                "Failed",
                "FailedJobs",
                "jobset failed due to reaching max number of restarts",
            )
            job["status"][self.status_field] = [self._jobs_status(failed=1)]
        set_condition(job, kind, "True", reason, message)
        job["status"]["terminalState"] = kind
        return reason, message

    @staticmethod
    def _jobs_status(**counts: int) -> dict[str, Any]:
        return {
            "name": "node",
            **{k: counts.get(k, 0) for k in ("ready", "succeeded", "failed", "active", "suspended")},
        }

    def pod(
        self, job: str, node: int, attempt: int, restarts: int
    ) -> tuple[str, dict[str, str], dict[str, str]]:
        """Name, labels and annotations of node ``node``'s pod: pod ``node`` of Indexed Job ``<job>-node-0``,
        made by the JobSet's ``restarts``-th restart.
        """
        # The Job controller appends 5 random characters; a hash keeps the stand-in deterministic.
        suffix = hashlib.sha256(f"{job}/{node}/{attempt}".encode()).hexdigest()[:5]
        labels = {
            self.job_label: job,
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "jobset.sigs.k8s.io/job-index": "0",
            "jobset.sigs.k8s.io/restart-attempt": str(restarts),
            "batch.kubernetes.io/job-name": f"{job}-node-0",
            "batch.kubernetes.io/job-completion-index": str(node),
        }
        annotations = {
            "batch.kubernetes.io/job-completion-index": str(node),
        }
        return f"{job}-node-0-{node}-{suffix}", labels, annotations


class TrainJobController(JobSetController):
    """Trainer's TrainJob controller: its JobSet has the TrainJob's name, so the pods are the JobSet's."""

    name = "trainjob"
    group, version, plural, kind = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
    status_field = "jobsStatus"
    success_condition = "Complete"

    def created(self, job: dict[str, Any], set_condition: SetCondition) -> None:
        job["status"].setdefault(self.status_field, [])

    def end(
        self, job: dict[str, Any], succeeded: bool, set_condition: SetCondition, now: str
    ) -> tuple[str, str]:
        reason, message = (
            ("JobsCompleted", "TrainJob completed") if succeeded else ("JobsFailed", "TrainJob failed")
        )
        job["status"][self.status_field] = [self._jobs_status(**{"succeeded" if succeeded else "failed": 1})]
        set_condition(job, self.success_condition if succeeded else "Failed", "True", reason, message)
        return reason, message

    def pod(
        self, job: str, node: int, attempt: int, restarts: int
    ) -> tuple[str, dict[str, str], dict[str, str]]:
        name, labels, annotations = super().pod(job, node, attempt, restarts)
        return name, {**labels, "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}, annotations


CONTROLLERS = {c.name: c for c in (PyTorchJobController(), TrainJobController(), JobSetController())}
