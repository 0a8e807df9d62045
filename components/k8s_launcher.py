"""Runs one PyTorchJob from submission to a verdict, the way a careful operator would.

``run_pytorchjob`` creates the job (or adopts the one already running for the same results
prefix), reports what Kueue and the Dynamic Workload Scheduler are doing while the job is
queued, streams the master's log once it runs, and ends in exactly one of: success, a failure
carrying the reason and the failing pod's last lines, a timeout, a rejected admission check, or
cancellation by SIGTERM. Every path that does not end in a finished job deletes the job.

Threads: the job is watched in one thread and the master log followed in another; both hand
their results to the calling thread, which alone decides and acts. SIGTERM is delivered to the
calling thread (it must be the main thread for the handler to be installed).
"""

from __future__ import annotations

import calendar
import collections
import queue
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from components.k8s_api import ApiError, KubernetesApi, WatchExpired
from components.pytorchjob import CONTAINER_NAME, QUEUE_NAME_LABEL, RESULTS_HASH_LABEL

DEFAULT_TIMEOUT_S = 24 * 3600  # queueing for DWS capacity can take hours; the run itself is capped by DWS
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
TERMINAL_PHASES = ("Succeeded", "Failed")

Log = Callable[[str], None]


class LauncherError(RuntimeError):
    """The job did not succeed; the message says why, in terms an operator can act on."""


class MissingClusterResource(LauncherError):
    """Something the job needs is not in the cluster (the PyTorchJob CRD, namespace or LocalQueue)."""


class AdmissionRejected(LauncherError):
    """A Kueue admission check (the DWS ProvisioningRequest) rejected the workload."""


class JobFailed(LauncherError):
    """The PyTorchJob ended Failed.

    Attributes:
        reason: The Failed condition's reason.
        condition_message: The Failed condition's message.
        log_tail: Last lines of the failing pod's log (may be empty).
        pod: The pod the tail comes from, if known.
    """

    def __init__(
        self, message: str, *, reason: str, condition_message: str, log_tail: list[str], pod: str | None
    ):
        super().__init__(message)
        self.reason = reason
        self.condition_message = condition_message
        self.log_tail = log_tail
        self.pod = pod


class JobTimedOut(LauncherError):
    """The job did not finish within the launcher's timeout (queueing included); it was deleted."""


class JobCancelled(SystemExit):
    """SIGTERM arrived (the pipeline run was cancelled); the job was deleted. Exits with 143."""

    def __init__(self, message: str):
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class JobOutcome:
    """A PyTorchJob that succeeded.

    Attributes:
        name: Job name (the adopted job's name when adopted).
        namespace: Job namespace.
        uid: Job uid.
        adopted: Whether an already running job was adopted instead of creating one.
        start_time: ``status.startTime`` of the job, if set.
        completion_time: ``status.completionTime`` of the job, if set.
        log_tail: The last lines streamed from the master pod.
    """

    name: str
    namespace: str
    uid: str
    adopted: bool
    start_time: str | None = None
    completion_time: str | None = None
    log_tail: list[str] = field(default_factory=list)


def _print(line: str) -> None:
    print(line, flush=True)


# -- reading job, workload and pod objects ----------------------------------------------------


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c.get("type"): c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def job_phase(job: dict[str, Any]) -> str:
    """Succeeded, Failed, Suspended (queued by Kueue), Running, Restarting or Starting."""
    conditions = _true_conditions(job)
    for phase in TERMINAL_PHASES:
        if phase in conditions:
            return phase
    if ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend") or "Suspended" in conditions:
        return "Suspended"
    for phase in ("Running", "Restarting"):
        if phase in conditions:
            return phase
    return "Starting"


def _condition_text(condition: dict[str, Any] | None) -> str:
    if not condition:
        return ""
    parts = [p for p in (condition.get("reason"), condition.get("message")) if p]
    return ": ".join(parts)


def _is_finished(job: dict[str, Any]) -> bool:
    return job_phase(job) in TERMINAL_PHASES


def _is_terminating(obj: dict[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def describe_workload(workload: dict[str, Any]) -> str:
    """One line: the Workload's conditions and its admission checks (DWS state + message)."""
    status = workload.get("status") or {}
    conditions = []
    for c in status.get("conditions") or []:
        text = f"{c.get('type')}={c.get('status')}"
        detail = _condition_text(c)
        conditions.append(f"{text} ({detail})" if detail else text)
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


def _container_state(pod: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            state = status.get("state") or {}
            for key in ("running", "terminated", "waiting"):
                if key in state:
                    return key, state[key]
    return "waiting", {}


def _pod_failure_time(pod: dict[str, Any]) -> str | None:
    """When the pytorch container failed (now or before a restart); None when it has not."""
    if (pod.get("status") or {}).get("phase") == "Failed":
        return _container_state(pod)[1].get("finishedAt") or ""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != CONTAINER_NAME:
            continue
        for state in (status.get("state") or {}, status.get("lastState") or {}):
            terminated = state.get("terminated")
            if terminated and terminated.get("exitCode", 0) != 0:
                return terminated.get("finishedAt") or ""
    return None


# -- log lines: timestamps and de-duplication across reconnects --------------------------------

_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_log_timestamp(text: str) -> tuple[int, int] | None:
    """``(epoch seconds, nanoseconds)`` of an RFC 3339 timestamp, or None if it is not one."""
    match = _TIMESTAMP.match(text)
    if not match:
        return None
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    zone = match.group(3)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds, int((match.group(2) or "0").ljust(9, "0"))


class LogDeduplicator:
    """Drops the lines a reconnected log stream repeats.

    ``sinceTime`` only has whole-second precision, so a reconnect replays the current second.
    Lines are ordered by timestamp; the only ambiguity is several lines sharing the last
    timestamp seen, which is resolved by counting how many of those were already emitted.
    """

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None
        self._emitted_at_last = 0
        self._seen_at_last_this_connection = 0

    def new_connection(self) -> None:
        self._seen_at_last_this_connection = 0

    def admit(self, stamp: tuple[int, int]) -> bool:
        if self.last is None or stamp > self.last:
            self.last = stamp
            self._emitted_at_last = self._seen_at_last_this_connection = 1
            return True
        if stamp < self.last:
            return False
        self._seen_at_last_this_connection += 1
        if self._seen_at_last_this_connection > self._emitted_at_last:
            self._emitted_at_last = self._seen_at_last_this_connection
            return True
        return False

    def since_time(self) -> str | None:
        """The ``sinceTime`` to reconnect with: the last line's second, so nothing is skipped."""
        if self.last is None:
            return None
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last[0]))


# -- the two background threads ------------------------------------------------------------------


class _JobWatcher(threading.Thread):
    """Watches one PyTorchJob and hands every new version of it to the calling thread.

    Resumes from the last resourceVersion after a dropped connection, and relists after a
    410 Gone. Unexpected API errors are handed over too, and end the thread.
    """

    def __init__(
        self,
        api: KubernetesApi,
        namespace: str,
        name: str,
        resource_version: str,
        out: queue.Queue[tuple[str, Any]],
        log: Log,
        retry_interval_s: float,
        watch_timeout_s: int,
    ):
        super().__init__(name=f"watch-{name}", daemon=True)
        self._api, self._namespace, self._name = api, namespace, name
        self._rv = resource_version
        self._out, self._log = out, log
        self._retry_interval_s, self._watch_timeout_s = retry_interval_s, watch_timeout_s
        self._stop_event = threading.Event()
        self._stream: Any = None

    def stop(self) -> None:
        self._stop_event.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    def run(self) -> None:
        selector = f"metadata.name={self._name}"
        relist = False
        while not self._stop_event.is_set():
            try:
                if relist:
                    listing = self._api.list_pytorchjobs(self._namespace, field_selector=selector)
                    self._rv = listing["metadata"]["resourceVersion"]
                    items = listing.get("items") or []
                    self._out.put(("job", items[0] if items else None))
                    relist = False
                self._stream = self._api.watch_pytorchjobs(
                    self._namespace,
                    resource_version=self._rv,
                    field_selector=selector,
                    timeout_seconds=self._watch_timeout_s,
                )
                if self._stop_event.is_set():
                    return
                for event in self._stream:
                    self._rv = event.resource_version or self._rv
                    if event.type == "BOOKMARK":
                        continue
                    self._out.put(("job", None if event.type == "DELETED" else event.object))
                # A clean end is the server's timeoutSeconds: rewatch from where we are.
            except WatchExpired:
                if self._stop_event.is_set():
                    return
                self._log(
                    f"watch of PyTorchJob {self._name}: resourceVersion {self._rv} expired "
                    "(410 Gone); relisting"
                )
                relist = True
            except (requests.RequestException, ValueError, OSError) as e:
                if self._stop_event.is_set():
                    return
                self._log(
                    f"watch of PyTorchJob {self._name} dropped ({type(e).__name__}); "
                    f"resuming from resourceVersion {self._rv}"
                )
                self._stop_event.wait(self._retry_interval_s)
            except ApiError as e:
                if self._stop_event.is_set():
                    return
                if e.status >= 500 or e.status == 429:
                    self._log(f"watch of PyTorchJob {self._name}: API server said {e}; retrying")
                    self._stop_event.wait(self._retry_interval_s)
                    continue
                self._out.put(("error", e))
                return
            except Exception as e:  # noqa: BLE001 - handed to the deciding thread, which re-raises it
                self._out.put(("error", e))
                return
            finally:
                self._stream = None


class _MasterLogFollower(threading.Thread):
    """Follows the master pod's ``pytorch`` container log into the launcher's log.

    Reconnects with ``sinceTime`` after a drop and de-duplicates by timestamp; switches to a new
    master pod when the operator recreates it. :meth:`finish` lets it read to the end of the
    log; :meth:`stop` cuts it off.
    """

    def __init__(
        self,
        api: KubernetesApi,
        namespace: str,
        job_name: str,
        log: Log,
        retry_interval_s: float,
        tail: collections.deque[str],
        dedupers: dict[str, LogDeduplicator],
    ):
        super().__init__(name=f"log-{job_name}", daemon=True)
        self._api, self._namespace, self._job_name, self._log = api, namespace, job_name, log
        self._retry_interval_s = retry_interval_s
        self.tail = tail
        self._dedupers = dedupers
        self._selector = f"{JOB_NAME_LABEL}={job_name},{REPLICA_TYPE_LABEL}=master,{REPLICA_INDEX_LABEL}=0"
        self._stopping = threading.Event()
        self._finishing = threading.Event()
        self._wake = threading.Event()
        self._stream: Any = None
        self._last_error = ""  # an error repeating every retry is logged once

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    def finish(self, timeout_s: float) -> None:
        """Reads what is left of the log (the container has exited), then stops."""
        self._finishing.set()
        self._wake.set()
        self.join(timeout_s)
        if self.is_alive():
            self.stop()
            self.join(timeout_s)

    def _pause(self) -> None:
        self._wake.wait(self._retry_interval_s)
        if not self._stopping.is_set():
            self._wake.clear()

    def _current_master(self) -> dict[str, Any] | None:
        pods = [p for p in self._api.list_pods(self._namespace, self._selector) if not _is_terminating(p)]
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        return pods[-1] if pods else None

    def run(self) -> None:
        following: str | None = None
        while not self._stopping.is_set():
            finishing = self._finishing.is_set()
            try:
                pod = self._current_master()
                if pod is None or _container_state(pod)[0] == "waiting":
                    if finishing:
                        return
                    self._pause()
                    continue
                pod_name, pod_uid = pod["metadata"]["name"], pod["metadata"]["uid"]
                if pod_uid != following:
                    following = pod_uid
                    self._log(f"following the log of pod {pod_name}")
                dedupe = self._dedupers.setdefault(pod_uid, LogDeduplicator())
                self._stream = self._api.stream_pod_log(
                    self._namespace, pod_name, CONTAINER_NAME, since_time=dedupe.since_time()
                )
                if self._stopping.is_set():
                    return
                dedupe.new_connection()
                for raw in self._stream:
                    self._emit(raw.decode("utf-8", "replace"), dedupe)
                if finishing:
                    return  # the container had exited, so this read reached the end of its log
            except ApiError as e:
                # 400: the container is not running yet; 404: the pod was replaced or deleted.
                if e.status not in (400, 404) and not self._stopping.is_set() and str(e) != self._last_error:
                    self._last_error = str(e)
                    self._log(f"log of the master pod: API server said {e}; retrying")
                if finishing:
                    return
            except (requests.RequestException, OSError, ValueError) as e:
                if self._stopping.is_set():
                    return
                self._log(f"log stream of the master pod dropped ({type(e).__name__}); reconnecting")
            finally:
                self._stream = None
            if not self._finishing.is_set():
                self._pause()

    def _emit(self, raw: str, dedupe: LogDeduplicator) -> None:
        stamp_text, _, text = raw.partition(" ")
        stamp = parse_log_timestamp(stamp_text)
        if stamp is None:
            text = raw  # not timestamped: nothing to de-duplicate on
        elif not dedupe.admit(stamp):
            return
        self.tail.append(text)
        self._log(f"[master] {text}")


# -- the run ------------------------------------------------------------------------------------


class _Run:
    """State of one ``run_pytorchjob`` call; only the calling thread touches it."""

    def __init__(
        self,
        api: KubernetesApi,
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
    ):
        self.api, self.manifest, self.log, self.clock = api, manifest, log, clock
        meta = manifest.get("metadata") or {}
        self.namespace: str = meta.get("namespace") or "default"
        self.name: str = meta["name"]
        self.labels: dict[str, str] = meta.get("labels") or {}
        self.timeout_s, self.poll_interval_s, self.retry_interval_s = (
            timeout_s,
            poll_interval_s,
            retry_interval_s,
        )
        self.log_tail_lines, self.deletion_wait_s = log_tail_lines, deletion_wait_s
        self.watch_timeout_s, self.log_drain_timeout_s = watch_timeout_s, log_drain_timeout_s
        self.deadline = clock() + timeout_s
        self.job: dict[str, Any] | None = None
        self.adopted = False
        self.owns_live_job = False  # a job exists that this call must not leave behind
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.watcher: _JobWatcher | None = None
        self.follower: _MasterLogFollower | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=log_tail_lines)
        self.dedupers: dict[str, LogDeduplicator] = {}
        self._pause = threading.Event()  # never set: an interruptible sleep for polling loops
        self._reported_evictions: set[str] = set()

    @property
    def ref(self) -> str:
        return f"PyTorchJob {self.namespace}/{self.name}"

    # submission ------------------------------------------------------------------------------

    def check_prerequisites(self) -> None:
        if not self.api.pytorchjob_api_available():
            raise MissingClusterResource(
                "PyTorchJob CRD (pytorchjobs.kubeflow.org/v1) is not installed in the "
                "cluster: install the Kubeflow Training Operator"
            )
        if self.api.namespace_exists(self.namespace) is False:
            raise MissingClusterResource(f"namespace {self.namespace!r} does not exist")
        queue_name = self.labels.get(QUEUE_NAME_LABEL)
        if queue_name:
            if self.api.kueue_api_version() is None:
                raise MissingClusterResource(
                    f"Kueue is not installed (no kueue.x-k8s.io API), but the job is "
                    f"labelled for LocalQueue {queue_name!r}"
                )
            try:
                found = self.api.get_localqueue(self.namespace, queue_name)
            except ApiError as e:
                self.log(f"cannot check LocalQueue {queue_name!r} ({e}); submitting anyway")
            else:
                if found is None:
                    raise MissingClusterResource(
                        f"LocalQueue {queue_name!r} does not exist in namespace "
                        f"{self.namespace!r} (is Kueue installed and cluster/ applied?)"
                    )

    def find_adoptable(self) -> dict[str, Any] | None:
        """A running or queued job for the same results prefix; waits out ones being deleted."""
        results_hash = self.labels.get(RESULTS_HASH_LABEL)
        if not results_hash:
            return None
        items = self.api.list_pytorchjobs(
            self.namespace, label_selector=f"{RESULTS_HASH_LABEL}={results_hash}"
        )
        items = items.get("items") or []
        live = sorted(
            (j for j in items if not _is_finished(j) and not _is_terminating(j)),
            key=lambda j: j["metadata"].get("creationTimestamp") or "",
        )
        if live:
            if len(live) > 1:
                self.log(
                    f"{len(live)} live PyTorchJobs write to the same results prefix: "
                    f"{', '.join(j['metadata']['name'] for j in live)}; adopting the oldest"
                )
            return live[0]
        for job in items:
            if _is_terminating(job):
                # Its pods may still be writing to the same prefix: starting another now would race them.
                self.log(
                    f"PyTorchJob {job['metadata']['name']} for the same results prefix is being deleted; "
                    "waiting until it is gone"
                )
                if not self.wait_until_gone(job["metadata"]["name"], self.deadline):
                    raise JobTimedOut(
                        f"PyTorchJob {self.namespace}/{job['metadata']['name']} for the same results "
                        f"prefix was still being deleted after {self.timeout_s:g}s; created nothing"
                    )
        return None

    def submit(self) -> None:
        self.check_prerequisites()
        existing = self.find_adoptable()
        if existing is not None:
            self.adopt(existing, "a rerun for the same results prefix")
            return
        try:
            self.job = self.api.create_pytorchjob(self.namespace, self.manifest)
        except ApiError as e:
            if e.status == 404:
                if (e.details or {}).get("kind") == "namespaces":
                    raise MissingClusterResource(f"namespace {self.namespace!r} does not exist") from None
                raise MissingClusterResource(
                    "PyTorchJob CRD (pytorchjobs.kubeflow.org/v1) is not installed in "
                    "the cluster: install the Kubeflow Training Operator"
                ) from None
            if e.status != 409:
                raise LauncherError(f"creating {self.ref} failed: {e}") from None
            self.replace_or_adopt_same_name()
            return
        self.owns_live_job = True
        self.log(f"created {self.ref} (uid {self.job['metadata'].get('uid')})")

    def replace_or_adopt_same_name(self) -> None:
        """A job with our name exists: a retry of the same run. Adopt it if live, else replace it."""
        current = self.api.get_pytorchjob(self.namespace, self.name)
        same_results = (current["metadata"].get("labels") or {}).get(RESULTS_HASH_LABEL) == self.labels.get(
            RESULTS_HASH_LABEL
        )
        if not same_results:
            raise LauncherError(
                f"{self.ref} already exists and writes to another results prefix; choose another job name"
            )
        if not _is_finished(current) and not _is_terminating(current):
            self.adopt(current, "a retry of the same run")
            return
        self.log(f"{self.ref} exists from an earlier attempt ({job_phase(current)}); replacing it")
        self.api.delete_pytorchjob(self.namespace, self.name)
        if not self.wait_until_gone(self.name, self.deadline):
            raise JobTimedOut(
                f"{self.ref} from an earlier attempt was still being deleted after "
                f"{self.timeout_s:g}s; created nothing"
            )
        self.job = self.api.create_pytorchjob(self.namespace, self.manifest)
        self.owns_live_job = True
        self.log(f"created {self.ref} (uid {self.job['metadata'].get('uid')})")

    def adopt(self, job: dict[str, Any], why: str) -> None:
        self.job, self.adopted, self.owns_live_job = job, True, True
        self.name = job["metadata"]["name"]
        self.log(
            f"adopting existing {self.ref} (uid {job['metadata'].get('uid')}, {job_phase(job)}) "
            f"instead of creating a new one: {why}"
        )

    def wait_until_gone(self, name: str, deadline: float) -> bool:
        while True:
            try:
                self.api.get_pytorchjob(self.namespace, name)
            except ApiError as e:
                if e.not_found:
                    return True
                raise
            if self.clock() >= deadline:
                return False
            self._pause.wait(min(self.retry_interval_s, max(0.0, deadline - self.clock())))

    # following ---------------------------------------------------------------------------------

    def follow(self) -> JobOutcome:
        assert self.job is not None
        self.watcher = _JobWatcher(
            self.api,
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
        last_phase: str | None = None
        ever_admitted = False
        next_report = self.clock()
        while True:
            phase = job_phase(job)
            if phase != last_phase:
                self.on_phase_change(job, last_phase, phase, ever_admitted)
                ever_admitted = ever_admitted or phase not in ("Suspended",)
                last_phase = phase
                next_report = self.clock()
            if phase == "Succeeded":
                return self.succeeded(job)
            if phase == "Failed":
                raise self.failed(job)
            now = self.clock()
            if phase in ("Suspended", "Starting") and now >= next_report:
                self.report_waiting(job, phase)
                next_report = now + self.poll_interval_s
            if now >= self.deadline:
                self.delete(f"timed out after {self.timeout_s:g}s", wait=True)
                raise JobTimedOut(
                    f"{self.ref} did not finish within {self.timeout_s:g}s (last phase: {phase}); deleted it"
                )
            wait = self.deadline - now
            if phase in ("Suspended", "Starting"):
                wait = min(wait, next_report - now)
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

    def on_phase_change(self, job: dict[str, Any], last: str | None, phase: str, ever_admitted: bool) -> None:
        detail = _condition_text(_true_conditions(job).get(phase))
        self.log(f"{self.ref}: {phase}" + (f" ({detail})" if detail else ""))
        if phase == "Suspended":
            if last is None:
                self.log(
                    f"{self.ref} is queued in Kueue LocalQueue {self.labels.get(QUEUE_NAME_LABEL)!r}; "
                    f"reporting every {self.poll_interval_s:g}s"
                )
            elif ever_admitted:
                # The evicted pod's last lines are still readable until it is gone: keep them.
                self.finish_follower()
                self.log(
                    f"{self.ref} was suspended again after admission: Kueue evicted its workload; "
                    "waiting for it to be readmitted"
                )
        elif last == "Suspended":
            self.log(f"{self.ref} was admitted by Kueue")
        if phase in ("Running", "Restarting"):
            self.start_follower()

    def report_waiting(self, job: dict[str, Any], phase: str) -> None:
        if (job["metadata"].get("labels") or {}).get(QUEUE_NAME_LABEL):
            self.report_workloads(job["metadata"].get("uid"), phase.lower())
        if phase == "Starting":
            self.report_pods()

    def report_workloads(self, job_uid: str, prefix: str) -> None:
        try:
            workloads = self.api.list_workloads(self.namespace, job_uid)
        except ApiError as e:
            self.log(f"{prefix}: cannot read Kueue workloads ({e})")
            return
        if not workloads:
            self.log(f"{prefix}: no Kueue workload for {self.ref} yet")
        for workload in workloads:
            self.log(f"{prefix}: {describe_workload(workload)}")
            self.check_workload(workload)

    def check_workload(self, workload: dict[str, Any]) -> None:
        status = workload.get("status") or {}
        for check in status.get("admissionChecks") or []:
            if check.get("state") == "Rejected":
                message = check.get("message") or "no message"
                self.delete(f"admission check {check.get('name')} rejected it", wait=True)
                raise AdmissionRejected(
                    f"{self.ref}: admission check {check.get('name')!r} rejected the workload: "
                    f"{message}; deleted the job"
                )
        evicted = _true_conditions(workload).get("Evicted")
        if evicted:
            key = f"{workload['metadata'].get('name')}@{evicted.get('lastTransitionTime')}"
            if key not in self._reported_evictions:
                self._reported_evictions.add(key)
                self.log(
                    f"evicted: workload {workload['metadata'].get('name')} was evicted "
                    f"({_condition_text(evicted)})"
                )

    def report_pods(self) -> None:
        try:
            pods = self.api.list_pods(self.namespace, f"{JOB_NAME_LABEL}={self.name}")
        except ApiError:
            return
        if pods:
            states = []
            for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
                key, state = _container_state(pod)
                reason = state.get("reason")
                states.append(
                    f"{pod['metadata']['name']} {(pod.get('status') or {}).get('phase', '?')}"
                    + (f" ({reason})" if key != "running" and reason else "")
                )
            self.log("starting: pods " + ", ".join(states))

    def start_follower(self) -> None:
        if self.follower is None or not self.follower.is_alive():
            self.follower = _MasterLogFollower(
                self.api, self.namespace, self.name, self.log, self.retry_interval_s, self.tail, self.dedupers
            )
            self.follower.start()

    def stop_follower(self) -> None:
        if self.follower is not None:
            self.follower.stop()
            self.follower = None

    def finish_follower(self) -> None:
        if self.follower is not None:
            self.follower.finish(timeout_s=self.log_drain_timeout_s)
            self.follower = None

    def succeeded(self, job: dict[str, Any]) -> JobOutcome:
        self.finish_follower()
        self.owns_live_job = False
        status = job.get("status") or {}
        self.log(f"{self.ref} succeeded")
        return JobOutcome(
            name=self.name,
            namespace=self.namespace,
            uid=job["metadata"].get("uid", ""),
            adopted=self.adopted,
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
            log_tail=list(self.tail),
        )

    def failed(self, job: dict[str, Any]) -> JobFailed:
        self.finish_follower()
        self.owns_live_job = False
        condition = _true_conditions(job).get("Failed") or {}
        reason, message = condition.get("reason", ""), condition.get("message", "")
        pod, tail = self.failing_pod_tail()
        text = f"{self.ref} failed: {reason}: {message}"
        if tail:
            text += f"\n--- last {len(tail)} log lines of {pod} ---\n" + "\n".join(tail)
        else:
            text += "\n(no log lines could be read from its pods)"
        return JobFailed(text, reason=reason, condition_message=message, log_tail=tail, pod=pod)

    def failing_pod_tail(self) -> tuple[str | None, list[str]]:
        """The earliest-failing pod's last lines; the streamed master log when pods are gone."""
        try:
            pods = self.api.list_pods(self.namespace, f"{JOB_NAME_LABEL}={self.name}")
        except ApiError:
            pods = []
        failing = sorted(
            ((t, p) for p in pods if (t := _pod_failure_time(p)) is not None),
            key=lambda tp: (tp[0], tp[1]["metadata"]["name"]),
        )
        for _, pod in failing:
            name = pod["metadata"]["name"]
            running_again = _container_state(pod)[0] == "running"
            try:
                text = self.api.read_pod_log(
                    self.namespace,
                    name,
                    CONTAINER_NAME,
                    tail_lines=self.log_tail_lines,
                    previous=running_again,
                )
            except (ApiError, requests.RequestException):
                continue
            lines = text.splitlines()
            if lines:
                return f"pod {name}", lines[-self.log_tail_lines :]
        if self.tail:
            return "the master pod (as streamed)", list(self.tail)
        return None, []

    # cleanup -------------------------------------------------------------------------------------

    def delete(self, why: str, wait: bool) -> None:
        """Deletes the job with foreground propagation (pods go first); idempotent."""
        self.stop_follower()
        if self.watcher is not None:
            self.watcher.stop()
        try:
            existed = self.api.delete_pytorchjob(self.namespace, self.name, propagation_policy="Foreground")
        finally:
            self.owns_live_job = False
        self.log(f"deleted {self.ref} ({why})" if existed else f"{self.ref} was already gone ({why})")
        if existed and wait and not self.wait_until_gone(self.name, self.clock() + self.deletion_wait_s):
            self.log(
                f"{self.ref} is still being deleted after {self.deletion_wait_s:g}s; "
                "the garbage collector will finish it"
            )

    def close(self) -> None:
        self.stop_follower()
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


def run_pytorchjob(
    api: KubernetesApi,
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
    handle_sigterm: bool = True,
) -> JobOutcome:
    """Creates (or adopts) a PyTorchJob and follows it to success, or raises.

    Args:
        api: The Kubernetes API seam.
        manifest: A PyTorchJob manifest (see :func:`components.pytorchjob.build_pytorchjob`).
        timeout_s: Limit on queueing plus running; the job is deleted when it is reached.
        poll_interval_s: How often the queue state (Kueue workload, admission checks) is reported
            while the job waits, and the longest the launcher blocks without re-checking.
        retry_interval_s: Pause before reconnecting a dropped watch or log stream.
        log: Where progress and the master log go (default: stdout).
        log_tail_lines: Log lines kept for the failure message.
        deletion_wait_s: How long a deletion on timeout/rejection is waited for.
        watch_timeout_s: Server-side timeout of each watch request.
        log_drain_timeout_s: How long, once the job has ended, the rest of the master log is
            waited for.
        clock: Monotonic clock in seconds (injectable for tests).
        handle_sigterm: Install a SIGTERM handler that deletes the job (main thread only).

    Returns:
        The succeeded job.

    Raises:
        MissingClusterResource: The PyTorchJob CRD, the namespace or the LocalQueue is missing.
        AdmissionRejected: The DWS admission check rejected the workload (job deleted).
        JobFailed: The job failed; the message has the reason and the failing pod's log tail.
        JobTimedOut: ``timeout_s`` passed (job deleted).
        JobCancelled: SIGTERM arrived (job deleted); a ``SystemExit`` with code 143.
        LauncherError: Anything else that stopped the launcher (job deleted).
    """
    run = _Run(
        api,
        manifest,
        timeout_s=timeout_s,
        poll_interval_s=poll_interval_s,
        retry_interval_s=retry_interval_s,
        log=_print if log is None else log,
        log_tail_lines=log_tail_lines,
        deletion_wait_s=deletion_wait_s,
        watch_timeout_s=watch_timeout_s,
        log_drain_timeout_s=log_drain_timeout_s,
        clock=clock,
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
        except Exception as e:  # noqa: BLE001 - still exit as cancelled
            run.log(f"could not delete {run.ref}: {e}")
        raise
    except BaseException:
        if run.owns_live_job:
            try:
                run.delete("the launcher stopped with an error", wait=False)
            except Exception as e:  # noqa: BLE001 - the original error matters more
                run.log(f"could not delete {run.ref}: {e}")
        raise
    finally:
        run.close()
        restore_sigterm()
