"""What Kueue and the Dynamic Workload Scheduler say about a queued job, as it changes.

Kueue makes one Workload per job (labelled with the job's uid, whatever its kind); its
conditions say whether quota is reserved and the job admitted, and its admission checks carry
the DWS ProvisioningRequest's state ("Pending: Waiting for resources..."). The job's LocalQueue
says whether anything can be admitted at all: its ``Active`` condition is False when its
ClusterQueue is inactive (a missing or inactive admission check or flavor), which no Workload
condition explains. The supervisor reports them while the job waits, each state once when it
changes and a short "still waiting" line otherwise, and stops at a rejected check.
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

# The LocalQueue's Active reason when its ClusterQueue is inactive (Kueue 0.19, localqueue_controller.go).
CLUSTER_QUEUE_INACTIVE = "ClusterQueueIsInactive"


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


def waiting_for(workload: dict[str, Any]) -> str:
    """What the Workload waits for next: quota, an admission check, admission, or the job's start."""
    conditions = true_conditions(workload)
    if "QuotaReserved" not in conditions:
        return "quota"
    checks = (workload.get("status") or {}).get("admissionChecks") or []
    pending = [str(c.get("name")) for c in checks if c.get("state") != "Ready"]
    if pending:
        return f"admission check {', '.join(pending)}"
    return "the job to start" if "Admitted" in conditions else "admission"


def duration(seconds: float) -> str:
    """``45s``, ``12m``, ``2h05m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# Kueue's Evicted/Requeued reason when it deactivates a workload whose admission check rejected it.
DEACTIVATED_BY_CHECK = "DeactivatedDueToAdmissionCheck"


def rejected_check(workload: dict[str, Any]) -> dict[str, Any] | None:
    """The admission check that rejected the workload (``name``, ``message``), if one did.

    Kueue (0.19) does not leave the check ``Rejected``: it deactivates the workload
    (``spec.active: false``), evicts it with reason ``DeactivatedDueToAdmissionCheck`` and resets
    the check to ``Pending`` ("Reset to Pending after eviction. Previously: Rejected"). Such a
    workload waits for a person to reactivate it, so the launcher must stop on either sign.
    """
    status = workload.get("status") or {}
    checks = status.get("admissionChecks") or []
    for check in checks:
        if check.get("state") == "Rejected":
            return check
    evicted = true_conditions(workload).get("Evicted") or {}
    if (workload.get("spec") or {}).get("active") is False and evicted.get("reason") == DEACTIVATED_BY_CHECK:
        message = evicted.get("message") or ""
        named = [c for c in checks if f'"{c.get("name")}"' in message]
        return {
            "name": (named[0] if named else checks[0] if checks else {}).get("name", "?"),
            "message": message,
        }
    return None


class QueueReporter:
    """Reports a queued job's LocalQueue and Kueue Workloads; says each state once, when it changes.

    Args:
        api: The API client.
        namespace: The job's namespace.
        ref: How log lines name the job (``PyTorchJob ns/name``).
        framework: The Kueue integration that must be enabled for this job kind.
        log: Where report lines go.
        queue: The job's LocalQueue.
        clock: Monotonic seconds, for how long a state has lasted.
    """

    def __init__(
        self,
        api: KubernetesApi,
        namespace: str,
        ref: str,
        framework: str,
        log: Callable[[str], None],
        queue: str | None,
        clock: Callable[[], float],
    ):
        self.api, self.namespace, self.ref, self.framework, self.log = api, namespace, ref, framework, log
        self.queue, self.clock = queue, clock
        self._evictions: set[str] = set()
        self._reports_without_workload = 0
        self._read_provisioning_requests = True
        self._read_local_queue = True
        self._local_queue_state: tuple[Any, ...] | None = None  # its Active condition as last said
        self._said: dict[str, tuple[str, float]] = {}  # per object: its line last said, and since when

    def report(self, job_uid: str, prefix: str) -> dict[str, Any] | None:
        """Logs what changed in the job's LocalQueue and Workloads; returns a rejected admission check, if any."""
        self._report_local_queue(prefix)
        try:
            workloads = self.api.list_workloads(self.namespace, job_uid)
        except ApiError as e:
            self.log(f"{prefix}: cannot read Kueue workloads ({e})")
            return None
        if not workloads:
            self._say(prefix, {"": f"no Kueue workload for {self.ref} yet"}, "Kueue to create its Workload")
            self._reports_without_workload += 1
            if self._reports_without_workload == MISSING_WORKLOAD_REPORTS:
                # A suspended job that Kueue ignores stays suspended until the timeout.
                self.log(
                    f"{prefix}: Kueue has made no Workload for {self.ref} after {MISSING_WORKLOAD_REPORTS} "
                    f"reports: is its {self.framework!r} integration enabled in Kueue's configuration "
                    "(integrations.frameworks; see cluster/README.md)?"
                )
        for workload in workloads:
            checks = (workload.get("status") or {}).get("admissionChecks") or []
            lines = {f"workload {workload['metadata'].get('name')}": describe_workload(workload)}
            if any(c.get("state") in ("Pending", "Retry") for c in checks):
                lines.update(self._provisioning(workload))
            self._say(prefix, lines, waiting_for(workload))
            self._report_eviction(workload)
            rejected = rejected_check(workload)
            if rejected is not None:
                return rejected
        return None

    def _say(self, prefix: str, lines: dict[str, str], waiting: str) -> None:
        """Logs the lines (keyed by the object each describes) that changed since last said; if
        none did, one short line: how long the wait for ``waiting`` has stayed as it is.
        """
        now = self.clock()
        changed = {key: line for key, line in lines.items() if self._said.get(key, ("", 0.0))[0] != line}
        if not changed:
            since = min(self._said[key][1] for key in lines)
            self.log(f"{prefix}: still waiting for {waiting} (for {duration(now - since)})")
            return
        for key, line in changed.items():
            self._said[key] = (line, now)
            self.log(f"{prefix}: {line}")

    def _report_local_queue(self, prefix: str) -> None:
        """Says why the LocalQueue admits nothing, once per change of its ``Active`` condition."""
        if not self.queue or not self._read_local_queue:
            return
        where = f"LocalQueue {self.namespace}/{self.queue}"
        try:
            local_queue = self.api.get_localqueue(self.namespace, self.queue)
        except ApiError as e:
            self._read_local_queue = False
            self.log(f"{prefix}: cannot read {where} ({e}); reporting its Workloads only")
            return
        active = next(
            (
                c
                for c in ((local_queue or {}).get("status") or {}).get("conditions") or []
                if c["type"] == "Active"
            ),
            {},
        )
        state = ("Missing",) if local_queue is None else (active.get("status"), condition_text(active))
        previous, self._local_queue_state = self._local_queue_state, state
        if state == previous:
            return
        if local_queue is None:
            self.log(f"{prefix}: {where} does not exist: nothing in it can be admitted")
        elif active.get("status") == "False":
            cluster_queue = (local_queue.get("spec") or {}).get("clusterQueue")
            # The LocalQueue only says its ClusterQueue is inactive; why is on the ClusterQueue,
            # which the launcher's namespaced Role may not read.
            why = (
                f" (`kubectl describe clusterqueue {cluster_queue}` says why, e.g. an inactive admission check)"
                if active.get("reason") == CLUSTER_QUEUE_INACTIVE
                else ""
            )
            self.log(
                f"{prefix}: {where} is inactive ({state[1]}): its ClusterQueue {cluster_queue} "
                f"admits nothing until it is active{why}"
            )
        elif previous is not None and active.get("status") == "True":
            self.log(f"{prefix}: {where} is active again ({state[1]})")

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

    def _provisioning(self, workload: dict[str, Any]) -> dict[str, str]:
        """The DWS ProvisioningRequests Kueue made for the workload (owned by it), one line each, by name."""
        if not self._read_provisioning_requests:
            return {}
        try:
            items = self.api.list(PROVISIONING_REQUEST, self.namespace).get("items") or []
        except ApiError as e:
            # 404: no queued provisioning in this cluster; 403: the Role does not grant it. Either way
            # the admission check's message says what Kueue knows; ask no more.
            self._read_provisioning_requests = False
            if e.status != 404:
                self.log(f"cannot read ProvisioningRequests ({e}); reporting admission checks only")
            return {}
        uid = workload["metadata"].get("uid")
        owned = (
            r for r in items if any(o.get("uid") == uid for o in r["metadata"].get("ownerReferences") or [])
        )
        return {
            f"provisioning request {name}": f"provisioning request {name}: "
            + (", ".join(_conditions(request)) or "no conditions yet")
            for request in owned
            if (name := request["metadata"].get("name"))
        }

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
