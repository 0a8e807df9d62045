"""What Kueue and the Dynamic Workload Scheduler say about a queued job, in one line per report.

Kueue makes one Workload per job (labelled with the job's uid, whatever its kind); its
conditions say whether quota is reserved and the job admitted, and its admission checks carry
the DWS ProvisioningRequest's state ("Pending: Waiting for resources..."). The supervisor reports
them while the job waits and stops at a rejected check.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from components.launch.kubernetes.api import ApiError, KubernetesApi, Resource
from components.launch.kubernetes.kinds import QUEUE_NAME_LABEL, SUSPENDED, true_conditions

# What Kueue's provisioning admission check creates for GKE's queued provisioning (DWS).
PROVISIONING_REQUEST = Resource("autoscaling.x-k8s.io", "v1", "provisioningrequests", "ProvisioningRequest")

# Reports without any Workload after which the kind's Kueue integration is suspected to be off.
MISSING_WORKLOAD_REPORTS = 3


def parse_time(stamp: str | None) -> datetime | None:
    """A Kubernetes RFC 3339 timestamp (``2026-10-01T02:00:00Z``) as an aware datetime."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def condition_text(condition: dict[str, Any] | None) -> str:
    """``reason: message`` of a status condition, or whichever of the two is set."""
    return ": ".join(p for p in ((condition or {}).get("reason"), (condition or {}).get("message")) if p)


def _conditions(obj: dict[str, Any]) -> list[str]:
    conditions = []
    for c in (obj.get("status") or {}).get("conditions") or []:
        text = f"{c.get('type')}={c.get('status')}"
        detail = condition_text(c)
        conditions.append(f"{text} ({detail})" if detail else text)
    return conditions


def describe_workload(workload: dict[str, Any]) -> str:
    """One line: the Workload's conditions and its admission checks (DWS state + message)."""
    status = workload.get("status") or {}
    conditions = _conditions(workload)
    checks = [
        f"{c.get('name')}: {c.get('state')}" + (f" ({c['message']})" if c.get("message") else "")
        for c in status.get("admissionChecks") or []
    ]
    line = f"workload {workload.get('metadata', {}).get('name')}: " + (
        ", ".join(conditions) or "no conditions yet"
    )
    if checks:
        line += "; admission checks: " + ", ".join(checks)
    return line


class QueueReporter:
    """Reports a queued job's Kueue Workloads; remembers what it already said.

    Args:
        api: The API client.
        namespace: The job's namespace.
        ref: How log lines name the job (``PyTorchJob ns/name``).
        framework: The Kueue integration that must be enabled for this job kind.
        log: Where report lines go.
    """

    def __init__(
        self, api: KubernetesApi, namespace: str, ref: str, framework: str, log: Callable[[str], None]
    ):
        self.api, self.namespace, self.ref, self.framework, self.log = api, namespace, ref, framework, log
        self._evictions: set[str] = set()
        self._reports_without_workload = 0
        self._read_provisioning_requests = True

    def report(self, job_uid: str, prefix: str) -> dict[str, Any] | None:
        """Logs the job's Workloads; returns a rejected admission check, if any."""
        try:
            workloads = self.api.list_workloads(self.namespace, job_uid)
        except ApiError as e:
            self.log(f"{prefix}: cannot read Kueue workloads ({e})")
            return None
        if not workloads:
            self.log(f"{prefix}: no Kueue workload for {self.ref} yet")
            self._reports_without_workload += 1
            if self._reports_without_workload == MISSING_WORKLOAD_REPORTS:
                # A suspended job that Kueue ignores stays suspended until the timeout.
                self.log(
                    f"{prefix}: Kueue has made no Workload for {self.ref} after {MISSING_WORKLOAD_REPORTS} "
                    f"reports: is its {self.framework!r} integration enabled in Kueue's configuration "
                    "(integrations.frameworks; see cluster/README.md)?"
                )
        for workload in workloads:
            self.log(f"{prefix}: {describe_workload(workload)}")
            self._report_eviction(workload)
            checks = (workload.get("status") or {}).get("admissionChecks") or []
            if any(c.get("state") in ("Pending", "Retry") for c in checks):
                self._report_provisioning(workload, prefix)
            for check in checks:
                if check.get("state") == "Rejected":
                    return check
        return None

    def admitted_since(self, job: dict[str, Any]) -> datetime | None:
        """When a job found running was admitted: its Workload's ``Admitted`` condition (the
        latest admission), or for a job outside Kueue its creation; None if the cluster says neither.
        """
        if not (job["metadata"].get("labels") or {}).get(QUEUE_NAME_LABEL):
            return parse_time(job["metadata"].get("creationTimestamp"))
        try:
            workloads = self.api.list_workloads(self.namespace, job["metadata"].get("uid", ""))
        except ApiError:
            return None
        for workload in workloads:
            for condition in (workload.get("status") or {}).get("conditions") or []:
                if condition.get("type") == "Admitted" and condition.get("status") == "True":
                    return parse_time(condition.get("lastTransitionTime"))
        return None

    def _report_provisioning(self, workload: dict[str, Any], prefix: str) -> None:
        """The DWS ProvisioningRequests Kueue made for the workload (owned by it), one line each."""
        if not self._read_provisioning_requests:
            return
        try:
            items = self.api.list(PROVISIONING_REQUEST, self.namespace).get("items") or []
        except ApiError as e:
            # 404: no queued provisioning in this cluster; 403: the Role does not grant it. Either way
            # the admission check's message above says what Kueue knows; ask no more.
            self._read_provisioning_requests = False
            if e.status != 404:
                self.log(f"{prefix}: cannot read ProvisioningRequests ({e}); reporting admission checks only")
            return
        uid = workload["metadata"].get("uid")
        for request in items:
            if any(o.get("uid") == uid for o in request["metadata"].get("ownerReferences") or []):
                state = ", ".join(_conditions(request)) or "no conditions yet"
                self.log(f"{prefix}: provisioning request {request['metadata'].get('name')}: {state}")

    def _report_eviction(self, workload: dict[str, Any]) -> None:
        evicted = true_conditions(workload).get("Evicted")
        if evicted:
            name = workload["metadata"].get("name")
            key = f"{name}@{evicted.get('lastTransitionTime')}"
            if key not in self._evictions:
                self._evictions.add(key)
                self.log(f"evicted: workload {name} was evicted ({condition_text(evicted)})")


class Admission:
    """When a job got its GPUs (its admission) and gave them back (its end), as the launcher saw it.

    Admission is the job's unsuspend by Kueue, which Kueue does once the job's Workload is
    Admitted: with the DWS admission check, once the ProvisioningRequest is Provisioned, that is
    once the GPU nodes exist and are billed. The nodes' start-up (image pull, model load) is billed
    too, so the first Running pod would be too late, and the job's creation too early: it can wait
    for capacity for hours holding nothing. A job without a queue is admitted as it is created.
    The launcher's own clock times both ends, not the objects' timestamps, so that they compare
    with the launch step's start without clock skew (the watch delivers the change within a
    fraction of a second). A job evicted and readmitted holds its GPUs only while admitted: its
    ``held_seconds`` add up each admission until the next eviction or the end, the wait between
    them left out (the nodes go back to DWS).

    Args:
        wall_clock: The current UTC time.
    """

    def __init__(self, wall_clock: Callable[[], datetime]):
        self.wall_clock = wall_clock
        self.admitted_at: datetime | None = None  # the first admission
        self.ended_at: datetime | None = None
        self.evictions = 0
        self._unknown = False
        self._since: datetime | None = None  # the admission the job holds its GPUs from now
        self._held = 0.0

    def saw(self, phase: str, *, adopted_running: bool, admitted_since: datetime | None = None) -> None:
        """The job entered ``phase``; ``adopted_running``: it was adopted, already admitted, since
        ``admitted_since`` (its Workload's or creation's timestamp, if the cluster had one).
        """
        if adopted_running and phase != SUSPENDED:
            if admitted_since is None:
                self._unknown = True  # admitted before this launcher looked: when is not known here
            else:
                self._since = self.admitted_at = admitted_since
        if self._unknown:
            return
        now = self.wall_clock()
        if phase != SUSPENDED and self._since is None:
            self._since = now
            self.admitted_at = self.admitted_at or now
        elif phase == SUSPENDED and self._since is not None:
            self._held += (now - self._since).total_seconds()
            self._since = None
            self.evictions += 1

    @property
    def held_seconds(self) -> float | None:
        """Seconds admitted, every admission until its eviction or the end; None if not known."""
        if self._unknown or self.admitted_at is None or self.ended_at is None:
            return None
        return self._held

    def ended(self) -> None:
        if self._since is not None and not self._unknown:
            # An adopted job's admission is the API server's time: a skew must not make it negative.
            self._held += max(0.0, (self.wall_clock() - self._since).total_seconds())
            self._since = None
        self.ended_at = self.wall_clock()
