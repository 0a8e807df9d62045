"""The supervisor's two kinds of background stream: the job's watch and its pods' logs.

A :class:`JobWatcher` watches one job object (any kind) and hands every new version of it to
the deciding thread; :class:`JobLogs` follows the log of every node of the job into the
launcher's log, one :class:`PodLogFollower` per node. Both survive dropped connections: the watch resumes from its last
resourceVersion (relisting after 410 Gone), the log reconnects with ``sinceTime`` and drops the
lines the reconnect replays.
"""

from __future__ import annotations

import calendar
import collections
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from components.launch.kubernetes.api import ApiError, KubernetesApi, Resource, WatchExpired
from components.launch.kubernetes.kinds import JobKind, node_order
from components.launch.kubernetes.pod import container_state, is_terminating

Log = Callable[[str], None]

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


class JobWatcher(threading.Thread):
    """Watches one job and hands every new version of it to the calling thread.

    Resumes from the last resourceVersion after a dropped connection, and relists after a
    410 Gone. Unexpected API errors are handed over too, and end the thread.
    """

    def __init__(
        self,
        api: KubernetesApi,
        resource: Resource,
        namespace: str,
        name: str,
        resource_version: str,
        out: queue.Queue[tuple[str, Any]],
        log: Log,
        retry_interval_s: float,
        watch_timeout_s: int,
    ):
        super().__init__(name=f"watch-{name}", daemon=True)
        self._api, self._resource, self._namespace, self._name = api, resource, namespace, name
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
                    listing = self._api.list(self._resource, self._namespace, field_selector=selector)
                    self._rv = listing["metadata"]["resourceVersion"]
                    items = listing.get("items") or []
                    self._out.put(("job", items[0] if items else None))
                    relist = False
                self._stream = self._api.watch(
                    self._resource,
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
                    f"watch of {self._resource.kind} {self._name}: resourceVersion {self._rv} expired "
                    "(410 Gone); relisting"
                )
                relist = True
            except (requests.RequestException, ValueError, OSError) as e:
                if self._stop_event.is_set():
                    return
                self._log(
                    f"watch of {self._resource.kind} {self._name} dropped ({type(e).__name__}); "
                    f"resuming from resourceVersion {self._rv}"
                )
                self._stop_event.wait(self._retry_interval_s)
            except ApiError as e:
                if self._stop_event.is_set():
                    return
                if e.status >= 500 or e.status == 429:
                    self._log(f"watch of {self._resource.kind} {self._name}: API server said {e}; retrying")
                    self._stop_event.wait(self._retry_interval_s)
                    continue
                self._out.put(("error", e))
                return
            except Exception as e:  # handed to the deciding thread, which re-raises it
                self._out.put(("error", e))
                return
            finally:
                self._stream = None


class PodLogFollower(threading.Thread):
    """Follows the worker container's log of one node of a job into the launcher's log.

    Each line goes out prefixed with the node (``[master-0] ...``). Reconnects with
    ``sinceTime`` after a drop and de-duplicates by timestamp; switches to the node's new pod
    when the controller recreates it. :meth:`request_finish` lets it read to the end of the log;
    :meth:`stop` cuts it off.

    Args:
        api: The API client.
        kind: The job's kind (its pod labels and main container).
        namespace: The job's namespace.
        job_name: The job's name.
        rank: Which node to follow, as ``kind.rank(pod)`` names it.
        log: Where the lines go.
        retry_interval_s: Pause before looking for the pod again or reconnecting.
        tail: Receives every line (without prefix); a bounded deque.
        dedupers: Per pod uid, what was already emitted (shared across followers of one run,
            so a follower restarted for the same pod replays nothing).
    """

    def __init__(
        self,
        api: KubernetesApi,
        kind: JobKind,
        namespace: str,
        job_name: str,
        rank: str,
        log: Log,
        retry_interval_s: float,
        tail: collections.deque[str],
        dedupers: dict[str, LogDeduplicator],
    ):
        super().__init__(name=f"log-{job_name}-{rank}", daemon=True)
        self._api, self._kind, self._namespace, self._job_name = api, kind, namespace, job_name
        self.rank, self._log = rank, log
        self._retry_interval_s = retry_interval_s
        self.tail = tail
        self._dedupers = dedupers
        self._stopping = threading.Event()
        self._finishing = threading.Event()
        self._wake = threading.Event()
        self._stream: Any = None
        self._last_error = ""  # an error repeating every retry is logged once
        self.pod_uid: str | None = None  # the pod followed now

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    def request_finish(self) -> None:
        """Asks the follower to read what is left of the log (the container has exited), then stop."""
        self._finishing.set()
        self._wake.set()

    def _pause(self) -> None:
        self._wake.wait(self._retry_interval_s)
        if not self._stopping.is_set():
            self._wake.clear()

    def _current_pod(self) -> dict[str, Any] | None:
        pods = [
            p
            for p in self._api.list_pods(self._namespace, self._kind.rank_selector(self._job_name, self.rank))
            if not is_terminating(p)
        ]
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        return pods[-1] if pods else None

    def run(self) -> None:
        following: str | None = None
        container = self._kind.container
        while not self._stopping.is_set():
            finishing = self._finishing.is_set()
            try:
                pod = self._current_pod()
                if pod is None or container_state(pod, container)[0] == "waiting":
                    if finishing:
                        return
                    self._pause()
                    continue
                pod_name, pod_uid = pod["metadata"]["name"], pod["metadata"]["uid"]
                if pod_uid != following:
                    following = self.pod_uid = pod_uid
                    self._log(f"following the log of pod {pod_name}")
                dedupe = self._dedupers.setdefault(pod_uid, LogDeduplicator())
                self._stream = self._api.stream_pod_log(
                    self._namespace, pod_name, container, since_time=dedupe.since_time()
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
                    self._log(f"log of {self.rank}: API server said {e}; retrying")
                if finishing:
                    return
            except (requests.RequestException, OSError, ValueError) as e:
                if self._stopping.is_set():
                    return
                self._log(f"log stream of {self.rank} dropped ({type(e).__name__}); reconnecting")
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
        self._log(f"[{self.rank}] {text}")


class JobLogs:
    """The followed logs of every node of one job, and what each node printed last.

    Args:
        api: The API client.
        kind: The job's kind.
        namespace: The job's namespace.
        log: Where followed lines go, each prefixed with its node (``[node-1] ...``).
        retry_interval_s: Pause before a follower looks again or reconnects.
        kept_lines: Lines kept per node, for the outcome and to explain a failure.
    """

    def __init__(
        self,
        api: KubernetesApi,
        kind: JobKind,
        namespace: str,
        log: Log,
        retry_interval_s: float,
        kept_lines: int,
    ):
        self.api, self.kind, self.namespace, self.log = api, kind, namespace, log
        self.retry_interval_s, self.kept_lines = retry_interval_s, kept_lines
        self.tails: dict[str, collections.deque[str]] = {}
        self._dedupers: dict[str, LogDeduplicator] = {}
        self._followers: dict[str, PodLogFollower] = {}

    def pods(self, job_name: str) -> list[dict[str, Any]]:
        """Every pod of the job."""
        return self.api.list_pods(self.namespace, self.kind.pod_selector(job_name))

    def follow_every_node(self, job_name: str) -> list[dict[str, Any]] | None:
        """Follows each node of the job that has a pod and no running follower yet; returns the
        pods it listed (None if it could not).
        """
        listed: list[dict[str, Any]] | None
        try:
            pods = listed = self.pods(job_name)
        except ApiError as e:
            self.log(f"cannot list the pods of {job_name} ({e}); following node 0 only")
            pods, listed = [], None
        newest: dict[str, dict[str, Any]] = {}
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
            if not is_terminating(pod):
                newest[self.kind.rank(pod)] = pod
        for rank in sorted({self.kind.rank(p) for p in pods} | {self.kind.leader_rank}, key=node_order):
            current = self._followers.get(rank)
            replaced = (
                rank in newest
                and current is not None
                and current.pod_uid not in (None, newest[rank]["metadata"]["uid"])
            )
            if replaced:
                # The node has a new pod (a restart): the old pod's stream need not end soon (a node
                # going away can hold it open until the read timeout), so cut it and follow the new one.
                current.stop()
            if current is None or replaced or not current.is_alive():
                tail = self.tails.setdefault(rank, collections.deque(maxlen=self.kept_lines))
                follower = PodLogFollower(
                    self.api,
                    self.kind,
                    self.namespace,
                    job_name,
                    rank,
                    self.log,
                    self.retry_interval_s,
                    tail,
                    self._dedupers,
                )
                self._followers[rank] = follower
                follower.start()
        return listed

    def stop(self) -> None:
        """Cuts every follower off."""
        for follower in self._followers.values():
            follower.stop()
        self._followers.clear()

    def finish(self, timeout_s: float) -> None:
        """Lets every follower read to the end of its log (the containers have exited)."""
        followers = list(self._followers.values())
        self._followers.clear()
        for follower in followers:
            follower.request_finish()
        deadline = time.monotonic() + timeout_s
        for follower in followers:
            follower.join(max(0.0, deadline - time.monotonic()))
        for follower in followers:
            if follower.is_alive():
                follower.stop()
                follower.join(timeout_s)

    def leader_tail(self, lines: int) -> list[str]:
        """The last lines node 0 printed (as streamed)."""
        return list(self.tails.get(self.kind.leader_rank, ()))[-lines:]

    def report_pods(self, job_name: str) -> list[dict[str, Any]] | None:
        """Logs the state of every pod of a starting job (image pulls, unschedulable pods); returns
        the pods (None if they could not be listed).
        """
        try:
            pods = self.pods(job_name)
        except ApiError:
            return None
        states = []
        for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
            key, state = container_state(pod, self.kind.container)
            reason = state.get("reason")
            states.append(
                f"{pod['metadata']['name']} {(pod.get('status') or {}).get('phase', '?')}"
                + (f" ({reason})" if key != "running" and reason else "")
            )
        if states:
            self.log("starting: pods " + ", ".join(states))
        return pods
