"""Runs one job, of any kind, from submission to a verdict, the way a careful operator would.

:func:`run_job` creates the job (or adopts the one already running for the same results
prefix), reports what Kueue and the Dynamic Workload Scheduler are doing while the job is
queued, streams its pods' logs once it runs, says when it restarts, and ends in exactly one of:
success, a failure carrying the reason and the failing pod's last lines, a timeout, a rejected
admission check, or cancellation by SIGTERM. Every path that does not end in a finished job
deletes the job. What differs between PyTorchJob, TrainJob and JobSet (API, conditions, pod
labels) comes from the job's kind (:mod:`components.launch.kubernetes.kinds`).

Threads: the job is watched in one thread and each followed log in another; they hand their
results to the calling thread, which alone decides and acts. SIGTERM is delivered to the
calling thread (it must be the main thread for the handler to be installed).
"""

from __future__ import annotations

import functools
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NoReturn

from components.launch.kubernetes.api import ApiError, KubernetesApi
from components.launch.kubernetes.deletion import PROPAGATION, Remains, wait_until_deleted
from components.launch.kubernetes.errors import (
    AdmissionRejected,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    LauncherError,
    MissingClusterResource,
)
from components.launch.kubernetes.failure import READ_LINES, explain, failed_node_logs, failure_message
from components.launch.kubernetes.kinds import (
    FINISHED,
    QUEUE_NAME_LABEL,
    RESTARTING,
    RESULTS_HASH_LABEL,
    STARTING,
    SUCCEEDED,
    SUSPENDED,
    JobKind,
    JobState,
)
from components.launch.kubernetes.kueue import Admission, QueueReporter
from components.launch.kubernetes.pod import is_terminating
from components.launch.kubernetes.prerequisites import check_prerequisites, missing_api, refused_namespace
from components.launch.kubernetes.restarts import RestartReporter
from components.launch.kubernetes.streams import JobLogs, JobWatcher, Log

DEFAULT_TIMEOUT_S = 24 * 3600  # queueing for DWS capacity can take hours; the run itself is capped by DWS


@dataclass
class JobOutcome:
    """A job that succeeded.

    Attributes:
        name: Job name (the adopted job's when adopted), in ``namespace``, with ``uid``.
        adopted: Whether an already running job was adopted instead of creating one.
        log_tail: The last lines streamed from the job's pods.
        admitted_at: Its first admission, ``ended_at`` its end, ``held_seconds`` the time it was
            admitted (``kueue.Admission``); adopted running: from its Workload's admission.
    """

    name: str
    namespace: str
    uid: str
    adopted: bool
    log_tail: list[str] = field(default_factory=list)
    admitted_at: datetime | None = None
    ended_at: datetime | None = None
    held_seconds: float | None = None


class _Run:
    """State of one :func:`run_job` call; only the calling thread touches it."""

    def __init__(
        self,
        api: KubernetesApi,
        kind: JobKind,
        manifest: dict[str, Any],
        *,
        timeout_s: float,
        poll_interval_s: float,
        retry_interval_s: float,
        log: Log,
        log_tail_lines: int,
        deletion_wait_s: float,
        watch_timeout_s: int,
        log_drain_timeout_s: float,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime],
    ):
        self.api, self.kind, self.manifest, self.log, self.clock = api, kind, manifest, log, clock
        self.admission = Admission(wall_clock)
        meta = manifest.get("metadata") or {}
        self.namespace: str = meta.get("namespace") or "default"
        self.name: str = meta["name"]
        self.labels: dict[str, str] = meta.get("labels") or {}
        self.timeout_s, self.poll_interval_s = timeout_s, poll_interval_s
        self.retry_interval_s = retry_interval_s
        self.log_tail_lines, self.deletion_wait_s = log_tail_lines, deletion_wait_s
        self.watch_timeout_s, self.log_drain_timeout_s = watch_timeout_s, log_drain_timeout_s
        self.deadline = clock() + timeout_s
        self.job: dict[str, Any] | None = None
        self.adopted = False
        self.owns_live_job = False  # a job exists that this call must not leave behind
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.watcher: JobWatcher | None = None
        self.logs = JobLogs(api, kind, self.namespace, log, retry_interval_s, READ_LINES)
        self.queue: QueueReporter | None = None
        self._pause = threading.Event()  # never set: an interruptible sleep for polling loops

    @property
    def ref(self) -> str:
        return f"{self.kind.resource.kind} {self.namespace}/{self.name}"

    def _ref_of(self, name: str) -> str:
        return f"{self.kind.resource.kind} {self.namespace}/{name}"

    def _is_finished(self, job: dict[str, Any]) -> bool:
        return self.kind.state(job).phase in FINISHED

    # submission ------------------------------------------------------------------------------

    def find_adoptable(self) -> dict[str, Any] | None:
        """A running or queued job for the same results prefix; waits out ones being deleted."""
        results_hash = self.labels.get(RESULTS_HASH_LABEL)
        if not results_hash:
            return None
        listing = self.api.list(
            self.kind.resource, self.namespace, label_selector=f"{RESULTS_HASH_LABEL}={results_hash}"
        )
        items = listing.get("items") or []
        live = sorted(
            (j for j in items if not self._is_finished(j) and not is_terminating(j)),
            key=lambda j: j["metadata"].get("creationTimestamp") or "",
        )
        if live:
            if len(live) > 1:
                self.log(
                    f"{len(live)} live {self.kind.resource.kind}s write to the same results prefix: "
                    f"{', '.join(j['metadata']['name'] for j in live)}; adopting the oldest"
                )
            return live[0]
        for job in items:
            if is_terminating(job):
                # Its pods may still be writing to the same prefix: starting another now would race them.
                name = job["metadata"]["name"]
                self.log(
                    f"{self.kind.resource.kind} {name} for the same results prefix is being deleted; "
                    "waiting until it is gone"
                )
                left = self._wait_deleted(name, self.deadline)
                if not left.gone:
                    raise JobTimedOut(
                        f"{self._ref_of(name)} for the same results prefix was still being deleted "
                        f"after {self.timeout_s:g}s ({left.describe(self._ref_of(name))}); created nothing"
                    )
        return None

    def submit(self) -> None:
        check_prerequisites(self.api, self.kind, self.namespace, self.labels.get(QUEUE_NAME_LABEL), self.log)
        try:
            existing = self.find_adoptable()
        except ApiError as e:
            raise refused_namespace(self.kind, self.namespace, e) if e.status == 403 else e from None
        if existing is not None:
            self.adopt(existing, "a rerun for the same results prefix")
            return
        try:
            self.create()
        except ApiError as e:
            if e.status == 404:
                if (e.details or {}).get("kind") == "namespaces":
                    raise MissingClusterResource(f"namespace {self.namespace!r} does not exist") from None
                raise missing_api(self.kind) from None
            if e.status != 409:
                raise LauncherError(f"creating {self.ref} failed: {e}") from None
            self.replace_or_adopt_same_name()

    def create(self) -> None:
        self.job = self.api.create(self.kind.resource, self.namespace, self.manifest)
        self.owns_live_job = True
        self.log(f"created {self.ref} (uid {self.job['metadata'].get('uid')})")

    def replace_or_adopt_same_name(self) -> None:
        """A job with our name exists: a retry of the same run. Adopt it if live, else replace it."""
        current = self.api.get(self.kind.resource, self.namespace, self.name)
        theirs = (current["metadata"].get("labels") or {}).get(RESULTS_HASH_LABEL)
        if theirs != self.labels.get(RESULTS_HASH_LABEL):
            raise LauncherError(
                f"{self.ref} already exists and writes to another results prefix; choose another job name"
            )
        if not self._is_finished(current) and not is_terminating(current):
            self.adopt(current, "a retry of the same run")
            return
        self.log(
            f"{self.ref} exists from an earlier attempt ({self.kind.state(current).phase}); replacing it"
        )
        left = self.delete("replacing an earlier attempt's finished job", wait=True)
        if left is not None and left.job:
            raise JobTimedOut(
                f"{self.ref} from an earlier attempt was still being deleted after "
                f"{self.deletion_wait_s:g}s; created nothing"
            )
        self.create()

    def adopt(self, job: dict[str, Any], why: str) -> None:
        self.job, self.adopted, self.owns_live_job = job, True, True
        self.name = job["metadata"]["name"]
        self.log(
            f"adopting existing {self.ref} (uid {job['metadata'].get('uid')}, {self.kind.state(job).phase}) "
            f"instead of creating a new one: {why}"
        )

    def _wait_deleted(self, name: str, deadline: float) -> Remains:
        return wait_until_deleted(
            self.api,
            self.kind,
            self.namespace,
            name,
            deadline=deadline,
            clock=self.clock,
            pause=self._pause.wait,
            retry_interval_s=self.retry_interval_s,
        )

    # following ---------------------------------------------------------------------------------

    def follow(self) -> JobOutcome:
        assert self.job is not None
        self.watcher = JobWatcher(
            self.api,
            self.kind.resource,
            self.namespace,
            self.name,
            self.job["metadata"]["resourceVersion"],
            self.events,
            self.log,
            self.retry_interval_s,
            self.watch_timeout_s,
        )
        self.watcher.start()
        job: dict[str, Any] = self.job
        queue_name = (job["metadata"].get("labels") or {}).get(QUEUE_NAME_LABEL)
        self.queue = QueueReporter(
            self.api, self.namespace, self.ref, self.kind.kueue_framework, self.log, queue_name, self.clock
        )
        restarts = RestartReporter(self.api, self.kind, self.namespace, self.name, self.ref, self.log)
        restarts.start(job, self.adopted)
        last_phase: str | None = None
        ever_admitted = False
        next_report = self.clock()
        while True:
            state = self.kind.state(job)
            phase = state.phase
            if phase != last_phase:
                self.on_phase_change(state, last_phase, ever_admitted)
                if phase == RESTARTING and last_phase is not None:
                    restarts.restarting(job)
                adopted = self.adopted and last_phase is None  # found running: when was it admitted?
                since = self.queue.admitted_since(job) if adopted and phase != SUSPENDED else None
                self.admission.saw(phase, adopted_running=adopted, admitted_since=since)
                ever_admitted = ever_admitted or phase != SUSPENDED
                last_phase = phase
                next_report = self.clock()
            if phase in FINISHED:
                return self.succeeded(job) if phase == SUCCEEDED else self.raise_failed(state)
            now = self.clock()
            pods = None  # listed in this turn, if they are
            if now >= next_report:
                if phase in (SUSPENDED, STARTING):
                    pods = self.report_waiting(job, phase)
                else:  # running: follow the nodes whose pods appeared (or were recreated) since
                    pods = self.logs.follow_every_node(self.name)
                next_report = now + self.poll_interval_s
            if phase != SUSPENDED:
                restarts.check(job, pods)
            if now >= self.deadline:
                self.delete(f"timed out after {self.timeout_s:g}s", wait=True)
                raise JobTimedOut(
                    f"{self.ref} did not finish within {self.timeout_s:g}s (last phase: {phase}); deleted it"
                )
            wait = min(self.deadline - now, next_report - now)
            try:
                kind, payload = self.events.get(timeout=max(0.0, min(wait, self.poll_interval_s)))
            except queue.Empty:
                continue
            if kind == "error":
                raise LauncherError(f"watching {self.ref} failed: {payload}")
            if payload is None:
                self.owns_live_job = False
                raise LauncherError(f"{self.ref} was deleted by someone else while it was {phase}")
            job = payload
            self.job = job

    def on_phase_change(self, state: JobState, last: str | None, ever_admitted: bool) -> None:
        phase = state.phase
        self.log(f"{self.ref}: {phase}" + (f" ({state.detail})" if state.detail else ""))
        if phase == SUSPENDED:
            if last is None:
                self.log(
                    f"{self.ref} is queued in Kueue LocalQueue {self.labels.get(QUEUE_NAME_LABEL)!r}; "
                    f"reporting every {self.poll_interval_s:g}s"
                )
            elif ever_admitted:
                # The evicted pod's last lines are still readable until it is gone: keep them.
                self.logs.finish(self.log_drain_timeout_s)
                self.log(
                    f"{self.ref} was suspended again after admission: Kueue evicted its workload; "
                    "waiting for it to be readmitted"
                )
        elif last == SUSPENDED:
            self.log(f"{self.ref} was admitted by Kueue")

    def report_waiting(self, job: dict[str, Any], phase: str) -> list[dict[str, Any]] | None:
        """Reports the queue and, for a starting job, its pods (returned; None if not listed)."""
        if (job["metadata"].get("labels") or {}).get(QUEUE_NAME_LABEL):
            assert self.queue is not None
            rejected = self.queue.report(job["metadata"].get("uid"), phase.lower())
            if rejected is not None:
                self.delete(f"admission check {rejected.get('name')} rejected it", wait=True)
                raise AdmissionRejected(
                    f"{self.ref}: admission check {rejected.get('name')!r} rejected the workload: "
                    f"{rejected.get('message') or 'no message'}; deleted the job"
                )
        return self.logs.report_pods(self.name) if phase == STARTING else None

    def succeeded(self, job: dict[str, Any]) -> JobOutcome:
        self.admission.ended()  # before draining the logs: the nodes are released from now
        self.logs.finish(self.log_drain_timeout_s)
        self.owns_live_job = False
        self.log(f"{self.ref} succeeded")
        return JobOutcome(
            self.name,
            self.namespace,
            job["metadata"].get("uid", ""),
            self.adopted,
            self.logs.leader_tail(self.log_tail_lines),
            self.admission.admitted_at,
            self.admission.ended_at,
            self.admission.held_seconds,
        )

    def raise_failed(self, state: JobState) -> NoReturn:
        self.logs.finish(self.log_drain_timeout_s)
        self.owns_live_job = False
        logs = failed_node_logs(self.api, self.kind, self.namespace, self.name, self.logs.tails)
        failure = explain(logs)
        message, tail = failure_message(self.ref, state, failure, self.log_tail_lines)
        pod = failure.first.source if failure.first else None
        raise JobFailed(message, reason=state.reason, condition_message=state.message, log_tail=tail, pod=pod)

    # cleanup -------------------------------------------------------------------------------------

    def delete(self, why: str, wait: bool) -> Remains | None:
        """Deletes the job with background propagation (:mod:`~components.launch.kubernetes.deletion`
        says why); idempotent. With ``wait``, waits up to ``deletion_wait_s`` until neither the job
        nor a pod of it that is not terminating is left, and returns what is left (None: unknown).
        """
        self.logs.stop()
        if self.watcher is not None:
            self.watcher.stop()
        try:
            existed = self.api.delete(
                self.kind.resource, self.namespace, self.name, propagation_policy=PROPAGATION
            )
        finally:
            self.owns_live_job = False
        done = f"deleted {self.ref} ({why})" if existed else f"{self.ref} was already gone ({why})"
        if not wait:
            self.log(f"{done}; its pods are deleted in the background, not waited for")
            return None
        try:
            left = self._wait_deleted(self.name, self.clock() + self.deletion_wait_s)
        except ApiError as e:
            self.log(f"{done}; cannot tell whether its pods are gone ({e})")
            return None
        waited = "" if left.gone else f"after {self.deletion_wait_s:g}s, "
        self.log(f"{done}; {waited}{left.describe(self.ref)}")
        return left

    def close(self) -> None:
        self.logs.stop()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.join(timeout=5)


def _install_sigterm_handler() -> Callable[[], None]:
    """Turns SIGTERM into :class:`JobCancelled` raised in this (main) thread; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    fired = threading.Event()

    def on_sigterm(signum: int, frame: Any) -> None:
        if fired.is_set():
            return  # a second SIGTERM must not interrupt the cleanup the first one started
        fired.set()
        raise JobCancelled("SIGTERM received: the pipeline run was cancelled")

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_job(
    api: KubernetesApi,
    kind: JobKind,
    manifest: dict[str, Any],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = 60.0,
    retry_interval_s: float = 5.0,
    log: Log | None = None,
    log_tail_lines: int = 50,
    deletion_wait_s: float = 120.0,
    watch_timeout_s: int = 300,
    log_drain_timeout_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    handle_sigterm: bool = True,
) -> JobOutcome:
    """Creates (or adopts) a job and follows it to success, or raises.

    Args:
        api: The Kubernetes API seam.
        kind: The job's kind.
        manifest: The job's manifest (``kind.build(...)``).
        timeout_s: Limit on queueing plus running; the job is deleted when it is reached.
        poll_interval_s: How often the queue state (Kueue workload, admission checks) is reported
            while the job waits, and the longest the launcher blocks without re-checking.
        retry_interval_s: Pause before reconnecting a dropped watch or log stream.
        log: Where progress and the pods' logs go (default: stdout).
        log_tail_lines: Log lines kept for the failure message.
        deletion_wait_s: How long a deletion (on timeout, rejection, or of an earlier attempt's
            job) is waited for: until neither the job nor a pod of it that is not terminating is left.
        watch_timeout_s: Server-side timeout of each watch request.
        log_drain_timeout_s: How long, once the job has ended, the rest of the logs is waited for.
        clock: Monotonic clock in seconds (injectable for tests).
        wall_clock: The UTC time of admission and end (injectable for tests).
        handle_sigterm: Install a SIGTERM handler that deletes the job (main thread only).

    Returns:
        The succeeded job.

    Raises:
        MissingClusterResource: The kind's CRD, the namespace or the LocalQueue is missing.
        AdmissionRejected: The DWS admission check rejected the workload (job deleted).
        JobFailed: The job failed; the message has the reason and the failing pod's log tail.
        JobTimedOut: ``timeout_s`` passed (job deleted).
        JobCancelled: SIGTERM arrived (job deleted); a ``SystemExit`` with code 143.
        LauncherError: Anything else that stopped the launcher (job deleted).
    """
    run = _Run(
        api,
        kind,
        manifest,
        timeout_s=timeout_s,
        poll_interval_s=poll_interval_s,
        retry_interval_s=retry_interval_s,
        log=functools.partial(print, flush=True) if log is None else log,
        log_tail_lines=log_tail_lines,
        deletion_wait_s=deletion_wait_s,
        watch_timeout_s=watch_timeout_s,
        log_drain_timeout_s=log_drain_timeout_s,
        clock=clock,
        wall_clock=wall_clock,
    )
    restore_sigterm = _install_sigterm_handler() if handle_sigterm else (lambda: None)
    try:
        run.submit()
        return run.follow()
    except JobCancelled:
        run.log(f"{run.ref}: cancelled by SIGTERM")
        try:
            # The grace period before SIGKILL is short: issue the delete, do not wait for it.
            run.delete("pipeline run cancelled", wait=False)
        except Exception as e:  # still exit as cancelled
            run.log(f"could not delete {run.ref}: {e}")
        raise
    except BaseException:
        if run.owns_live_job:
            try:
                run.delete("the launcher stopped with an error", wait=False)
            except Exception as e:  # the original error matters more
                run.log(f"could not delete {run.ref}: {e}")
        raise
    finally:
        run.close()
        restore_sigterm()
