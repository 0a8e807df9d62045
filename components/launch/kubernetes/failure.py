"""Why a job failed, in the words of the rank that failed first.

The failing pods are read in the order their worker containers failed (``finishedAt``, then
node order); in each pod's log (torchrun ``--tee`` tells its processes apart) the process
errors are found and causes told from echoes (:mod:`components.launch.failures`). The first
cause wins; the message ends with it, so the last lines of the launch task's log and the KFP
task error are that rank's error, not the ``Connection closed by peer`` of its peers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import requests

from components.launch.failures import ProcessError, first_cause, process_errors
from components.launch.kubernetes.api import ApiError, KubernetesApi
from components.launch.kubernetes.kinds import JobKind, JobState, node_order
from components.launch.kubernetes.pod import container_state, failure_time

# Lines read from each failed pod: its cause can sit above its peers' echoes and torchrun's summary.
READ_LINES = 2000


@dataclass
class NodeLog:
    """What one node printed: from its failed pod, or as streamed when the pod is gone."""

    rank: str
    source: str  # "pod <name>" or "<rank> (as streamed)"
    lines: list[str]
    errors: list[ProcessError] = field(default_factory=list)

    def __post_init__(self) -> None:
        errors = process_errors(self.lines)
        # torchrun's own traceback (no process prefix) only echoes its processes' errors.
        self.errors = [e for e in errors if e.process] if any(e.process for e in errors) else errors


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


def failed_node_logs(
    api: KubernetesApi, kind: JobKind, namespace: str, job_name: str, streamed: Mapping[str, Sequence[str]]
) -> list[NodeLog]:
    """The logs of the job's failed pods, earliest failure first; the streamed logs when none is readable."""
    try:
        pods = api.list_pods(namespace, kind.pod_selector(job_name))
    except ApiError:
        pods = []
    failing = sorted(
        ((t, p) for p in pods if (t := failure_time(p, kind.container)) is not None),
        key=lambda tp: (tp[0], node_order(kind.rank(tp[1])), tp[1]["metadata"]["name"]),
    )
    logs = []
    for _, pod in failing:
        name = pod["metadata"]["name"]
        running_again = container_state(pod, kind.container)[0] == "running"
        try:
            text = api.read_pod_log(
                namespace, name, kind.container, tail_lines=READ_LINES, previous=running_again
            )
        except (ApiError, requests.RequestException):
            continue
        if text.strip():
            logs.append(NodeLog(kind.rank(pod), f"pod {name}", text.splitlines()))
    if logs:
        return logs
    return [
        NodeLog(rank, f"{rank} (as streamed)", list(lines))
        for rank, lines in sorted(streamed.items(), key=lambda item: node_order(item[0]))
        if lines
    ]


def explain(logs: Sequence[NodeLog]) -> Failure:
    """The first node whose error is a cause, else the first node that printed an error or failed."""
    candidates = [(log, first_cause(log.errors)) for log in logs]
    chosen = next(((log, e) for log, e in candidates if e is not None and not e.echo), None)
    chosen = chosen or next(((log, e) for log, e in candidates if e is not None), None)
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
    verdict = f"{first.rank} ({first.source}{process}) failed first: {error.cause}" if error else ""
    # The cause opens the message (where a UI shows one line) and ends it (where a log shows the end).
    lines = [
        f"{text}: {verdict}" if verdict else text,
        f"--- last {len(tail)} log lines of {first.source} ---",
        *tail,
    ]
    lines += [f"{rank} failed too: {cause}" for rank, cause in failure.echoes]
    if error is not None:
        lines.append(verdict)
        if len(error.excerpt) > 1 and not _within(error.excerpt, tail):
            lines += [f"--- {first.rank}{process} ---", *error.excerpt]
    return "\n".join(lines), tail


def _within(excerpt: Sequence[str], tail: Sequence[str]) -> bool:
    """Whether the excerpt is already shown, whole, in the tail."""
    n = len(excerpt)
    return any(list(tail[i : i + n]) == list(excerpt) for i in range(len(tail) - n + 1))
