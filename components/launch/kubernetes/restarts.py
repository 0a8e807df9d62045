"""Saying when a running job restarted, one line per restart, naming the rank that failed and why.

A JobSet restarts its whole gang when a rank fails (``failurePolicy.maxRestarts``): it counts
the restarts in ``status.restarts`` and labels every pod with the restart attempt that made it.
A TrainJob runs as such a JobSet, which the launcher's Role may not read, so its restarts are
told by its pods' labels alone. A PyTorchJob restarts the failed pod alone and says so with
its Restarting condition. The supervisor keeps following the logs: each node's follower moves
to the node's new pod by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from components.launch.kubernetes.api import ApiError, KubernetesApi
from components.launch.kubernetes.failure import failing_pods
from components.launch.kubernetes.kinds import JobKind
from components.launch.kubernetes.pod import failure_status, pod_place


class RestartReporter:
    """Reports the restarts of one job as they show.

    Args:
        api: The API client.
        kind: The job's kind.
        namespace: The job's namespace.
        name: The job's name.
        ref: How log lines name the job (``JobSet ns/name``).
        log: Where report lines go.
    """

    def __init__(
        self,
        api: KubernetesApi,
        kind: JobKind,
        namespace: str,
        name: str,
        ref: str,
        log: Callable[[str], None],
    ):
        self.api, self.kind, self.log = api, kind, log
        self.namespace, self.name, self.ref = namespace, name, ref
        self.seen = 0  # the restarts reported so far, or known of when the job was adopted
        # Failed pods seen in any listing, by restart attempt: JobSet deletes a failed gang's pods
        # as it restarts it, often before a listing that shows the restart.
        self._failed: dict[int | None, dict[str, dict[str, Any]]] = {}

    def start(self, job: dict[str, Any], adopted: bool) -> None:
        """Takes an adopted job's earlier restarts as known: whoever saw them reported them."""
        if adopted and self.kind.gang_restarts(job) is not None:
            self.seen = self._attempt(job, self._pods() or [])

    def check(self, job: dict[str, Any], pods: Sequence[dict[str, Any]] | None = None) -> None:
        """Reports the gang restarts since the last check; ``pods``: the job's pods, if just listed.

        The job object alone is looked at when no pods are given; the pods are listed only once
        it shows a restart, to say which rank failed.
        """
        if self.kind.gang_restarts(job) is None:
            return
        self._remember(pods or ())
        attempt = self._attempt(job, pods or ())
        if attempt <= self.seen:
            return
        if pods is None:
            pods = self._pods() or []
            self._remember(pods)
            attempt = max(attempt, self._attempt(job, pods))
        for restart in range(self.seen + 1, attempt + 1):
            previous = list(self._failed.get(restart - 1, {}).values())
            # Within one gang the first failure is the cause; its peers fail after it, of it.
            failed = failing_pods(self.kind, previous)
            self._report(job, "gang restart", restart, failed[0] if failed else None)
        self.seen = attempt

    def restarting(self, job: dict[str, Any]) -> None:
        """The job entered its Restarting phase (a kind that restarts single pods)."""
        self.seen += 1
        # Pods restart in place, keeping their earlier failures: this restart's is the latest.
        failed = failing_pods(self.kind, self._pods() or [])
        self._report(job, "restart", self.seen, failed[-1] if failed else None)

    def _remember(self, pods: Sequence[dict[str, Any]]) -> None:
        for pod in failing_pods(self.kind, pods):
            self._failed.setdefault(self.kind.restart_attempt(pod), {})[pod["metadata"]["uid"]] = pod

    def _attempt(self, job: dict[str, Any], pods: Sequence[dict[str, Any]]) -> int:
        labelled = (self.kind.restart_attempt(p) for p in pods)
        return max([self.kind.gang_restarts(job) or 0, *(a for a in labelled if a is not None)])

    def _pods(self) -> list[dict[str, Any]] | None:
        try:
            return self.api.list_pods(self.namespace, self.kind.pod_selector(self.name))
        except ApiError as e:
            self.log(f"cannot list the pods of {self.ref} ({e})")
            return None

    def _report(self, job: dict[str, Any], what: str, number: int, pod: dict[str, Any] | None) -> None:
        limit = self.kind.max_restarts(job)
        line = f"{self.ref}: {what} {number}" + (f" of {limit}" if limit is not None else "")
        if pod is None:
            self.log(f"{line}: the failed pod is gone, so which rank failed is not known")
            return
        status = failure_status(pod, self.kind.container) or "no reason given"
        self.log(f"{line}: {self.kind.rank(pod)} ({pod_place(pod)}) failed: {status}")
