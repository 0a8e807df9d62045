"""Why a job failed, in the words of the rank that failed first.

The failing pods are read in the order their worker containers failed (``finishedAt``, then
node order); in each pod's log (torchrun ``--tee`` tells its processes apart) the process
errors are found and causes told from echoes (:mod:`components.launch.failures`). The first
cause wins; the message ends with it, so the last lines of the launch task's log and the KFP
task error are that rank's error, not the ``Connection closed by peer`` of its peers. The
failing pods' own status (exit code and reason, eviction, node) goes with it, and names the
rank that failed first when no log line can be read at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from components.launch.failures import ProcessError, first_cause, process_errors
from components.launch.kubernetes.api import ApiError, KubernetesApi
from components.launch.kubernetes.kinds import JobKind, JobState, node_order
from components.launch.kubernetes.pod import container_state, failure_status, failure_time, pod_place

# Lines read from each failed pod: its cause can sit above its peers' echoes and torchrun's summary.
READ_LINES = 2000


@dataclass
class NodeLog:
    """What one node printed, from its failed pod or as streamed, and what its pod's status says.

    Attributes:
        rank: The node, as the kind names it.
        source: ``pod <name>`` or ``<rank> (as streamed)`` (no pod of it is left).
        lines: Its log lines (empty when none could be read).
        status: The failed pod's own account (:func:`~components.launch.kubernetes.pod.failure_status`).
        place: The pod and the Kubernetes node it ran on (:func:`~components.launch.kubernetes.pod.pod_place`).
        as_streamed: The lines are what was streamed of the node, its pod's log being unreadable.
    """

    rank: str
    source: str
    lines: list[str]
    status: str = ""
    place: str = ""
    as_streamed: bool = False
    errors: list[ProcessError] = field(default_factory=list)

    def __post_init__(self) -> None:
        errors = process_errors(self.lines)
        # torchrun's own traceback (no process prefix) only echoes its processes' errors.
        self.errors = [e for e in errors if e.process] if any(e.process for e in errors) else errors

    @property
    def where(self) -> str:
        """Where the lines come from: ``pod x-node-0-1 on gke-a3-7``, ``node-1 (as streamed)``."""
        return (self.place or self.source) + (", log as streamed" if self.as_streamed else "")


@dataclass
class Failure:
    """The explanation of a failed job.

    Attributes:
        first: The node whose error is the cause (or the first to fail), if any could be read.
        error: That node's first cause, if it printed one.
        echoes: ``(rank, cause)`` of the other nodes' errors.
    """

    first: NodeLog | None
    error: ProcessError | None
    echoes: list[tuple[str, str]]


def failing_pods(kind: JobKind, pods: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods whose worker container failed, earliest failure first (then node order)."""
    failing = [(t, p) for p in pods if (t := failure_time(p, kind.container)) is not None]
    failing.sort(key=lambda tp: (tp[0], node_order(kind.rank(tp[1])), tp[1]["metadata"]["name"]))
    return [p for _, p in failing]


def failed_node_logs(
    api: KubernetesApi, kind: JobKind, namespace: str, job_name: str, streamed: Mapping[str, Sequence[str]]
) -> list[NodeLog]:
    """The job's failed pods, earliest failure first, each with its log and status.

    A failing pod whose log cannot be read takes what was streamed of its node; when no failing
    pod has a line, the other nodes' streamed logs follow (their echoes), and with no failing pod
    left the streamed logs are all there is.
    """
    try:
        pods = api.list_pods(namespace, kind.pod_selector(job_name))
    except ApiError:
        pods = []
    # The last gang's failure ended the job; the earlier gangs' were restarted past.
    attempts = [a for p in pods if (a := kind.restart_attempt(p)) is not None]
    pods = [p for p in pods if kind.restart_attempt(p) in (None, max(attempts, default=None))]
    logs = []
    for pod in failing_pods(kind, pods):
        rank, name = kind.rank(pod), pod["metadata"]["name"]
        lines = _read_log(api, kind, namespace, pod)
        # One stream per node, whatever pods it ran in: shown once, for its earliest failure.
        as_streamed = not lines and bool(streamed.get(rank)) and all(log.rank != rank for log in logs)
        if as_streamed:
            lines = list(streamed[rank])
        status = failure_status(pod, kind.container)
        logs.append(NodeLog(rank, f"pod {name}", lines, status, pod_place(pod), as_streamed))
    if any(log.lines for log in logs):
        return logs
    failed_ranks = {log.rank for log in logs}
    return logs + [
        NodeLog(rank, f"{rank} (as streamed)", list(lines))
        for rank, lines in sorted(streamed.items(), key=lambda item: node_order(item[0]))
        if lines and rank not in failed_ranks
    ]


def _read_log(api: KubernetesApi, kind: JobKind, namespace: str, pod: dict[str, Any]) -> list[str]:
    """The failed container's last lines (the previous run's if it runs again); none if unreadable."""
    running_again = container_state(pod, kind.container)[0] == "running"
    try:
        text = api.read_pod_log(
            namespace, pod["metadata"]["name"], kind.container, tail_lines=READ_LINES, previous=running_again
        )
    except (ApiError, requests.RequestException):
        return []
    return text.splitlines() if text.strip() else []


def explain(logs: Sequence[NodeLog]) -> Failure:
    """The first node whose error is a cause, else the first that failed (by its pod's status) or
    printed an error, else the first node.
    """
    candidates = [(log, first_cause(log.errors)) for log in logs]
    chosen = next(((log, e) for log, e in candidates if e is not None and not e.echo), None)
    chosen = chosen or next(((log, e) for log, e in candidates if e is not None or log.status), None)
    chosen = chosen or (candidates[0] if candidates else (None, None))
    log, error = chosen
    echoes = [(other.rank, e.cause) for other, e in candidates if other is not log and e is not None]
    return Failure(log, error, echoes)


def failure_message(ref: str, state: JobState, failure: Failure, tail_lines: int) -> tuple[str, list[str]]:
    """The message of the job's failure (ending with the first failing rank's error) and the tail shown."""
    text = f"{ref} failed ({state.detail or 'no reason given'})"
    first = failure.first
    if first is None:
        return text + "\n(no log lines could be read from its pods)", []
    tail = first.lines[-tail_lines:]
    error = failure.error
    process = f", process {error.process}" if error and error.process else ""
    failed = f"{first.rank} ({first.where}{process}) failed first"
    if error is not None:
        verdict = f"{failed}{f' ({first.status})' if first.status else ''}: {error.cause}"
    else:
        verdict = f"{failed}: {first.status}" if first.status else ""
    # The cause opens the message (where a UI shows one line) and ends it (where a log shows the end).
    lines = [f"{text}: {verdict}" if verdict else text]
    if tail:
        lines += [f"--- last {len(tail)} log lines of {first.where} ---", *tail]
    else:
        lines.append(f"(no log lines could be read from {first.source})")
    lines += [f"{rank} failed too: {cause}" for rank, cause in failure.echoes]
    if verdict:
        lines.append(verdict)
    if error is not None and len(error.excerpt) > 1 and not _within(error.excerpt, tail):
        lines += [f"--- {first.rank}{process} ---", *error.excerpt]
    return "\n".join(lines), tail


def _within(excerpt: Sequence[str], tail: Sequence[str]) -> bool:
    """Whether the excerpt is already shown, whole, in the tail."""
    n = len(excerpt)
    return any(list(tail[i : i + n]) == list(excerpt) for i in range(len(tail) - n + 1))
