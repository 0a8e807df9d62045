"""A local HTTP stand-in for the Kubernetes API server (the only part that cannot run here).

Everything else in the launcher tests is real: the launcher, its HTTP client
(:class:`components.launch.kubernetes.api.KubernetesApi`), ``requests``, sockets, threads and
signals. This module plays the API server together with the controllers behind it: Kueue
(suspending a queued job, its Workload and admission check, the DWS ProvisioningRequest), the
job kind's own controller (one of :mod:`tests.support.k8s_controllers`: the Training Operator,
Kubeflow Trainer or JobSet, each with its conditions and pod labels) and garbage collection on
delete. It serves exactly the paths the client uses:

* discovery ``/apis/<group>/<version>``, ``/apis/kueue.x-k8s.io`` and ``/api/v1/namespaces/{ns}``;
* the job kind's create / get / list / delete, and watch (chunked JSON lines, resourceVersion,
  fieldSelector, 410 Gone);
* Kueue Workloads (list by label), LocalQueues (get) and ProvisioningRequests (list);
* pods (list by label) and pod logs (plain, or followed as a chunked stream with
  timestamps and ``sinceTime`` at whole-second precision like the kubelet).

Every request is recorded (method, path, query, body). The world changes only through scripted
:class:`Step` objects that fire when the launcher makes a given request, or through methods
the test calls; nothing waits on wall-clock time to move the scenario forward.
"""

from __future__ import annotations

import calendar
import copy
import itertools
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.support.http_stand_in import LoopbackServer, QuietHandler
from tests.support.k8s_controllers import CONTROLLERS

JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DWS_CHECK = "dws-prov"
CLUSTER_QUEUE = "dws-cluster-queue"
DWS_WAITING = (
    "Waiting for resources. Currently there are not enough resources available to fulfill the request."
)
LOG_EPOCH = calendar.timegm((2026, 11, 24, 20, 0, 0))  # all default log lines fall in this one second
NAMESPACE = "batch-inference"


@dataclass
class Request:
    """One request as the stand-in received it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any = None


@dataclass
class Step:
    """A change to the world, made once a request matching ``when`` is received or served.

    Attributes:
        when: Predicate on the request.
        then: The change; called with the stand-in.
        at: ``"served"`` (after the response, for a stream after its end) or ``"received"``.
    """

    when: Callable[[Request], bool]
    then: Callable[[KubeApiStandIn], Any]
    at: str = "served"


@dataclass
class _Pod:
    obj: dict[str, Any]
    job: str
    node: int
    lines: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, text)
    deleted: bool = False


def listed_workloads(request: Request) -> bool:
    """Step trigger: the launcher read the job's Kueue Workloads (its queue report)."""
    return request.method == "GET" and request.path.endswith("/workloads")


def listed_provisioning_requests(request: Request) -> bool:
    """Step trigger: the launcher read the DWS ProvisioningRequests (after a Pending admission check)."""
    return request.method == "GET" and request.path.endswith("/provisioningrequests")


def listed_all_pods(request: Request) -> bool:
    """Step trigger: the launcher listed every pod of the job (not one node's)."""
    selector = request.query.get("labelSelector", "")
    return request.path.endswith("/pods") and not any(
        key in selector for key in ("replica-type", "job-completion-index")
    )


_ticks = itertools.count()


def _now() -> str:
    """An RFC 3339 time that increases by one second per call: ordered, readable, deterministic."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(LOG_EPOCH - 86400 + next(_ticks)))


def _set_condition(obj: dict[str, Any], type_: str, status: str, reason: str = "", message: str = "") -> None:
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != status:
                condition["lastTransitionTime"] = _now()
            condition.update(status=status, reason=reason, message=message)
            return
    conditions.append(
        {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}
    )


class KubeApiStandIn:
    """A local HTTP stand-in for the Kubernetes API server, on 127.0.0.1 in a thread.

    Args:
        kind: Which job kind's controller runs (``pytorchjob``, ``trainjob``, ``jobset``).
        namespaces: Namespaces that exist.
        local_queues: ``(namespace, name)`` of LocalQueues that exist.
        crd_installed: Whether the job kind's CRD is installed.
        namespace_read_allowed: False answers 403 to namespace reads, as for a namespaced Role.
        kueue_installed: Whether the Kueue API group is served.
        kueue_manages: Whether Kueue's integration for the kind is on (else queued jobs get no Workload).
        kueue_version: Kueue API version served.
        provisioning_requests: Whether the ProvisioningRequest API (queued provisioning) is served.
        tls: Serve HTTPS with this server-side context (``tests.support.tls``) instead of HTTP.
    """

    def __init__(
        self,
        *,
        kind: str = "pytorchjob",
        namespaces: tuple[str, ...] = (NAMESPACE,),
        local_queues: tuple[tuple[str, str], ...] = ((NAMESPACE, "dws-local-queue"),),
        crd_installed: bool = True,
        namespace_read_allowed: bool = True,
        kueue_installed: bool = True,
        kueue_manages: bool = True,
        kueue_version: str = "v1beta2",
        provisioning_requests: bool = True,
        tls: ssl.SSLContext | None = None,
    ):
        self.controller = CONTROLLERS[kind]
        self.namespaces = set(namespaces)
        self.local_queues = set(local_queues)
        self.crd_installed = crd_installed
        self.namespace_read_allowed = namespace_read_allowed
        self.kueue_installed = kueue_installed
        self.kueue_manages = kueue_manages
        self.kueue_version = kueue_version
        self.serves_provisioning_requests = provisioning_requests
        self.requests: list[Request] = []
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.workloads: dict[tuple[str, str], dict[str, Any]] = {}
        self.provisioning_requests: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], _Pod] = {}
        self.ended: dict[str, tuple[str, str]] = {}  # job name -> (reason, message) of its end
        self.step_errors: list[BaseException] = []
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, namespace, type, object)
        self._rv = itertools.count(1000)
        self._current_rv = 999
        self._cond = threading.Condition(threading.RLock())
        self._steps: deque[Step] = deque()
        self._watch_faults: deque[dict[str, Any]] = deque()
        self._log_faults: dict[str, deque[int]] = {}
        self._log_clock = itertools.count(1)
        self._attempts: dict[tuple[str, int], int] = {}
        self._closing = False
        self._tls = tls
        self._collector_lags = False
        self._server: LoopbackServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> KubeApiStandIn:
        stand_in = self

        class Handler(_Handler):
            world = stand_in

        self._server = LoopbackServer(Handler, "k8s-stand-in", self._tls)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        assert self._server is not None
        self._server.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    @property
    def jobs_path(self) -> str:
        """The URL path of the job kind's objects in the test namespace."""
        c = self.controller
        return f"/apis/{c.group}/{c.version}/namespaces/{NAMESPACE}/{c.plural}"

    # -- scripting -----------------------------------------------------------------------------------

    def script(self, *steps: Step) -> None:
        """Queues steps; each fires once, in order, on the first matching request after the previous."""
        with self._cond:
            self._steps.extend(steps)

    def fail_next_watch(self, *, drop_after_events: int | None = None, gone: bool = False) -> None:
        """The next watch connection is cut after N events, or answered with a 410 Gone event."""
        with self._cond:
            self._watch_faults.append({"drop_after": drop_after_events, "gone": gone})

    def drop_next_log_stream(self, pod: str, after_lines: int) -> None:
        """The next followed log stream of ``pod`` is cut after ``after_lines`` lines."""
        with self._cond:
            self._log_faults.setdefault(pod, deque()).append(after_lines)

    def followed_log(self, node: int, *, since: bool | None = None) -> Callable[[Request], bool]:
        """Step trigger: the launcher opened a followed log stream of node ``node``'s pod.

        Args:
            node: The node (0: the master / coordinator).
            since: True: only a reconnect (with ``sinceTime``); False: only a first connection.
        """

        def matches(request: Request) -> bool:
            found = re.match(r"^/api/v1/namespaces/[^/]+/pods/(?P<pod>[^/]+)/log$", request.path)
            if not found or request.query.get("follow") != "true":
                return False
            if since is not None and ("sinceTime" in request.query) != since:
                return False
            with self._cond:
                pod = self.pods.get((NAMESPACE, found["pod"]))
                return pod is not None and pod.node == node

        return matches

    def _fire_steps(self, request: Request, at: str) -> None:
        with self._cond:
            if not self._steps or self._steps[0].at != at or not self._steps[0].when(request):
                return
            step = self._steps.popleft()
            try:
                step.then(self)
            except BaseException as e:  # surfaced by the test through step_errors
                self.step_errors.append(e)

    def steps_left(self) -> int:
        with self._cond:
            return len(self._steps)

    # -- inspection ---------------------------------------------------------------------------------

    def calls(self, method: str, path_suffix: str = "", **query: str) -> list[Request]:
        """Recorded requests with this method whose path ends with ``path_suffix`` and query matches."""
        with self._cond:
            return [
                r
                for r in self.requests
                if r.method == method
                and r.path.endswith(path_suffix)
                and all(r.query.get(k) == v for k, v in query.items())
            ]

    def watches(self) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.query.get("watch") == "true"]

    def job(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        with self._cond:
            return copy.deepcopy(self.jobs.get((namespace, name)))

    def pod_name(self, job: str, node: int) -> str:
        """The name of node ``node``'s current pod."""
        with self._cond:
            return next(k[1] for k, p in reversed(self.pods.items()) if p.job == job and p.node == node)

    # -- the world: jobs and workloads --------------------------------------------------------------

    def _bump(self, namespace: str, event_type: str, obj: dict[str, Any]) -> None:
        rv = next(self._rv)
        self._current_rv = rv
        obj["metadata"]["resourceVersion"] = str(rv)
        self._events.append((rv, namespace, event_type, copy.deepcopy(obj)))
        self._cond.notify_all()

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        """What the API server, the kind's controller and Kueue do with a new job."""
        with self._cond:
            job = copy.deepcopy(body)
            job.setdefault("status", {})
            meta = job["metadata"]
            namespace = meta.get("namespace", "default")
            uid = str(uuid.uuid4())
            meta.update(uid=uid, creationTimestamp=_now(), generation=1)
            self.controller.created(job, _set_condition)
            queue = (meta.get("labels") or {}).get(QUEUE_LABEL)
            if queue and self.kueue_installed and self.kueue_manages:
                self.controller.suspend(job, _set_condition)
                self._new_workload(namespace, meta["name"], uid, queue)
            elif self.controller.is_suspended(job):
                self.controller.suspend(job, _set_condition)  # created suspended; nobody admits it
            self.jobs[(namespace, meta["name"])] = job
            self._bump(namespace, "ADDED", job)
            return copy.deepcopy(job)

    def _new_workload(self, namespace: str, job_name: str, job_uid: str, queue: str) -> None:
        name = f"{self.controller.name}-{job_name}-{job_uid[:5]}"
        workload = {
            "apiVersion": f"kueue.x-k8s.io/{self.kueue_version}",
            "kind": "Workload",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": {JOB_UID_LABEL: job_uid},
            },
            "spec": {"queueName": queue},
            "status": {},
        }
        self.workloads[(namespace, name)] = workload
        self._reserve_quota(workload)

    def _reserve_quota(self, workload: dict[str, Any]) -> None:
        """Kueue reserves quota; the DWS admission check makes its ProvisioningRequest and waits on it."""
        _set_condition(
            workload,
            "QuotaReserved",
            "True",
            "QuotaReserved",
            f"Quota reserved in ClusterQueue {CLUSTER_QUEUE}",
        )
        _set_condition(workload, "Admitted", "False", "NoChecks", "The workload has pending admission checks")
        workload["status"]["admissionChecks"] = [
            {"name": DWS_CHECK, "state": "Pending", "message": DWS_WAITING, "lastTransitionTime": _now()}
        ]
        self._provisioning_request(workload, attempt=1)

    def _provisioning_request(self, workload: dict[str, Any], attempt: int) -> dict[str, Any]:
        """The ProvisioningRequest Kueue's admission check makes for the workload (owned by it)."""
        meta = workload["metadata"]
        name = f"{meta['name']}-{DWS_CHECK}-{attempt}"
        request = {
            "apiVersion": "autoscaling.x-k8s.io/v1",
            "kind": "ProvisioningRequest",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "ownerReferences": [
                    {
                        "apiVersion": workload["apiVersion"],
                        "kind": "Workload",
                        "name": meta["name"],
                        "uid": meta["uid"],
                    }
                ],
            },
            "spec": {"provisioningClassName": "queued-provisioning.gke.io"},
            "status": {},
        }
        _set_condition(request, "Accepted", "True", "Accepted", "The request was accepted")
        _set_condition(request, "Provisioned", "False", "NotProvisioned", DWS_WAITING)
        self.provisioning_requests[(meta["namespace"], name)] = request
        return request

    def update_job(
        self, name: str, change: Callable[[dict[str, Any]], None], namespace: str = NAMESPACE
    ) -> None:
        with self._cond:
            job = self.jobs[(namespace, name)]
            change(job)
            self._bump(namespace, "MODIFIED", job)

    def workload_of(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        with self._cond:
            uid = self.jobs[(namespace, name)]["metadata"]["uid"]
            return next(w for w in self.workloads.values() if w["metadata"]["labels"][JOB_UID_LABEL] == uid)

    def _requests_of(self, workload: dict[str, Any]) -> list[dict[str, Any]]:
        uid = workload["metadata"]["uid"]
        return [
            r
            for r in self.provisioning_requests.values()
            if r["metadata"]["ownerReferences"][0]["uid"] == uid
        ]

    def set_admission_check(self, name: str, state: str, message: str, namespace: str = NAMESPACE) -> None:
        with self._cond:
            workload = self.workload_of(name, namespace)
            workload["status"]["admissionChecks"] = [
                {"name": DWS_CHECK, "state": state, "message": message, "lastTransitionTime": _now()}
            ]
            if state == "Rejected":
                for request in self._requests_of(workload):
                    _set_condition(request, "Failed", "True", "ProvisioningFailed", message)

    def admit(self, name: str, namespace: str = NAMESPACE) -> None:
        """DWS provisioned the nodes, Kueue admitted the workload and the controller started the pods."""
        with self._cond:
            workload = self.workload_of(name, namespace)
            workload["status"]["admissionChecks"] = [
                {
                    "name": DWS_CHECK,
                    "state": "Ready",
                    "message": "Provisioning Request was successfully provisioned.",
                    "lastTransitionTime": _now(),
                }
            ]
            for request in self._requests_of(workload):
                _set_condition(
                    request,
                    "Provisioned",
                    "True",
                    "Provisioned",
                    "Provisioning Request was successfully provisioned.",
                )
            _set_condition(workload, "QuotaReserved", "True", "QuotaReserved", "Quota reserved")
            _set_condition(workload, "Admitted", "True", "Admitted", "The workload is admitted")
            _set_condition(workload, "Evicted", "False", "", "")
            self.start(name, namespace)

    def start(self, name: str, namespace: str = NAMESPACE) -> None:
        """The controller runs the job's pods (after admission, or at once without Kueue)."""
        self.update_job(name, lambda job: self.controller.run(job, _set_condition, _now()), namespace)

    def finish(self, name: str, *, succeeded: bool, namespace: str = NAMESPACE) -> tuple[str, str]:
        """The job ends; returns the (reason, message) its controller gave."""
        with self._cond:
            ended: list[tuple[str, str]] = []
            self.update_job(
                name,
                lambda job: ended.append(self.controller.end(job, succeeded, _set_condition, _now())),
                namespace,
            )
            self.ended[name] = ended[0]
            return ended[0]

    # -- the world: pods and logs -------------------------------------------------------------------

    def add_pod(
        self,
        job: str,
        node: int,
        lines: list[str] | tuple[str, ...] = (),
        *,
        state: str = "running",
        exit_code: int = 0,
        namespace: str = NAMESPACE,
        finished_at: str | None = None,
    ) -> str:
        """Node ``node``'s pod of ``job`` (0: the master), whose worker container has printed ``lines``."""
        with self._cond:
            attempt = self._attempts.get((job, node), 0)
            self._attempts[(job, node)] = attempt + 1
            name, labels, annotations = self.controller.pod(job, node, attempt, 0)
            pod = _Pod(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "uid": str(uuid.uuid4()),
                        "creationTimestamp": _now(),
                        "labels": labels,
                        "annotations": annotations,
                    },
                    "spec": {"nodeName": f"gke-a3-ultra-{node}"},
                    "status": {
                        "phase": "Running",
                        "containerStatuses": [
                            {"name": self.controller.container, "state": {"running": {}}, "restartCount": 0}
                        ],
                    },
                },
                job,
                node,
            )
            self.pods[(namespace, name)] = pod
            self.append_log(name, *lines, namespace=namespace)
            if state == "terminated":
                self.terminate_pod(name, exit_code, namespace=namespace, finished_at=finished_at)
            elif state == "waiting":
                pod.obj["status"].update(phase="Pending")
                pod.obj["status"]["containerStatuses"][0]["state"] = {
                    "waiting": {"reason": "ContainerCreating"}
                }
            return name

    def log_stamp(self) -> str:
        """The next log timestamp: nanosecond steps inside one second, so reconnects replay lines."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(LOG_EPOCH)) + f".{next(self._log_clock):09d}Z"

    def append_log(self, pod: str, *lines: str | tuple[str, str], namespace: str = NAMESPACE) -> None:
        """Appends lines (text, or ``(timestamp, text)``) to the container log and wakes followers."""
        with self._cond:
            target = self.pods[(namespace, pod)]
            for line in lines:
                target.lines.append(line if isinstance(line, tuple) else (self.log_stamp(), line))
            self._cond.notify_all()

    def terminate_pod(
        self,
        pod: str,
        exit_code: int,
        namespace: str = NAMESPACE,
        finished_at: str | None = None,
        reason: str | None = None,
    ) -> None:
        """The worker container exits (``reason`` as the kubelet gives it, e.g. ``OOMKilled``)."""
        with self._cond:
            obj = self.pods[(namespace, pod)].obj
            obj["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            obj["status"]["containerStatuses"][0]["state"] = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                    "finishedAt": finished_at or _now(),
                }
            }
            self._cond.notify_all()

    def delete_pod(self, pod: str, namespace: str = NAMESPACE) -> None:
        with self._cond:
            removed = self.pods.pop((namespace, pod), None)
            if removed is not None:
                removed.deleted = True
            self._cond.notify_all()

    # -- request handling (called from the handler threads) ---------------------------------------------

    def record(self, request: Request) -> None:
        with self._cond:
            self.requests.append(request)

    def hold_dependents(self) -> None:
        """The garbage collector lags: the pods of the jobs deleted from now on run until collect_garbage()."""
        with self._cond:
            self._collector_lags = True

    def collect_garbage(self, job: str, namespace: str = NAMESPACE) -> None:
        """The collector reaches a deleted job's pods: they are terminating, and stay listed as such."""
        with self._cond:
            for pod in self.pods.values():
                if pod.job == job and pod.obj["metadata"]["namespace"] == namespace:
                    pod.obj["metadata"].setdefault("deletionTimestamp", _now())

    def delete_job(self, namespace: str, name: str) -> bool:
        """Deletion with background propagation: the job and its Workload go at once, its pods at once
        too unless :meth:`hold_dependents` was called.
        """
        with self._cond:
            job = self.jobs.pop((namespace, name), None)
            if job is None:
                return False
            job["metadata"]["deletionTimestamp"] = _now()
            self._bump(namespace, "DELETED", job)
            uid = job["metadata"]["uid"]
            for key in [
                k for k, w in self.workloads.items() if w["metadata"]["labels"][JOB_UID_LABEL] == uid
            ]:
                for request in self._requests_of(self.workloads[key]):
                    del self.provisioning_requests[
                        (request["metadata"]["namespace"], request["metadata"]["name"])
                    ]
                del self.workloads[key]
            if not self._collector_lags:
                for key in [k for k, p in self.pods.items() if p.job == name]:
                    self.delete_pod(key[1], namespace)
            return True


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


_NAMESPACED = r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"


class _Handler(QuietHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; avoid 40 ms ACK stalls
    world: KubeApiStandIn

    _ROUTES = [
        ("GET", re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)$"), "get_namespace"),
        ("GET", re.compile(r"^/apis/kueue\.x-k8s\.io$"), "kueue_group"),
        ("GET", re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)$"), "discovery"),
        (
            "GET",
            re.compile(r"^/apis/kueue\.x-k8s\.io/(?P<v>[^/]+)/namespaces/(?P<ns>[^/]+)/workloads$"),
            "list_workloads",
        ),
        (
            "GET",
            re.compile(
                r"^/apis/kueue\.x-k8s\.io/(?P<v>[^/]+)/namespaces/(?P<ns>[^/]+)/localqueues/(?P<name>[^/]+)$"
            ),
            "get_localqueue",
        ),
        (
            "GET",
            re.compile(r"^/apis/autoscaling\.x-k8s\.io/v1/namespaces/(?P<ns>[^/]+)/provisioningrequests$"),
            "list_provisioning_requests",
        ),
        ("GET", re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$"), "list_pods"),
        ("GET", re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$"), "pod_log"),
        ("POST", re.compile(_NAMESPACED + "$"), "create_job"),
        ("GET", re.compile(_NAMESPACED + "$"), "list_jobs"),
        ("GET", re.compile(_NAMESPACED + r"/(?P<name>[^/]+)$"), "get_job"),
        ("DELETE", re.compile(_NAMESPACED + r"/(?P<name>[^/]+)$"), "delete_job"),
    ]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        body = self.read_json()
        request = Request(method, parts.path, dict(parse_qsl(parts.query)), body)
        self.world.record(request)
        self.world._fire_steps(request, "received")
        for route_method, pattern, handler in self._ROUTES:
            match = pattern.match(parts.path) if route_method == method else None
            if match:
                args = match.groupdict()
                if "plural" in args and not self._is_our_kind(
                    args.pop("group"), args.pop("version"), args.pop("plural")
                ):
                    continue
                getattr(self, "_" + handler)(request, **args)
                break
        else:
            self._not_found()
        self.world._fire_steps(request, "served")

    def _is_our_kind(self, group: str, version: str, plural: str) -> bool:
        c = self.world.controller
        return self.world.crd_installed and (group, version, plural) == (c.group, c.version, c.plural)

    def _not_found(self) -> None:
        self._status(404, "NotFound", "the server could not find the requested resource")

    def _object_status(self, code: int, reason: str, name: str, verb: str) -> None:
        c = self.world.controller
        self._status(
            code,
            reason,
            f'{c.plural}.{c.group} "{name}" {verb}',
            {"name": name, "group": c.group, "kind": c.plural},
        )

    # -- responses -------------------------------------------------------------------------------------

    def _status(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        if details:
            status["details"] = details
        self.send_json(code, status)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _cut(self) -> None:
        """Drops the connection mid-stream, as a load balancer or API server restart would."""
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    # -- routes --------------------------------------------------------------------------------------------

    def _discovery(self, request: Request, group: str, version: str) -> None:
        world, c = self.world, self.world.controller
        if (group, version) == ("autoscaling.x-k8s.io", "v1") and world.serves_provisioning_requests:
            resources = [{"name": "provisioningrequests", "namespaced": True, "kind": "ProvisioningRequest"}]
        elif (group, version) == (c.group, c.version) and world.crd_installed:
            resources = [
                {
                    "name": c.plural,
                    "namespaced": True,
                    "kind": c.kind,
                    "verbs": ["create", "delete", "get", "list", "watch"],
                },
                {"name": f"{c.plural}/status", "namespaced": True, "kind": c.kind, "verbs": ["get"]},
            ]
        else:
            self._not_found()
            return
        self.send_json(
            200,
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{group}/{version}",
                "resources": resources,
            },
        )

    def _kueue_group(self, request: Request) -> None:
        if not self.world.kueue_installed:
            self._not_found()
            return
        version = {
            "groupVersion": f"kueue.x-k8s.io/{self.world.kueue_version}",
            "version": self.world.kueue_version,
        }
        self.send_json(
            200,
            {
                "kind": "APIGroup",
                "apiVersion": "v1",
                "name": "kueue.x-k8s.io",
                "versions": [version],
                "preferredVersion": version,
            },
        )

    def _get_namespace(self, request: Request, ns: str) -> None:
        if not self.world.namespace_read_allowed:
            self._status(
                403, "Forbidden", f'namespaces "{ns}" is forbidden: User cannot get resource "namespaces"'
            )
        elif ns in self.world.namespaces:
            self.send_json(200, {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns}})
        else:
            self._status(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})

    def _create_job(self, request: Request, ns: str) -> None:
        world = self.world
        name = request.body["metadata"]["name"]
        if ns not in world.namespaces:
            self._status(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        elif (ns, name) in world.jobs:
            self._object_status(409, "AlreadyExists", name, "already exists")
        else:
            self.send_json(201, world.create_job(request.body))

    def _list_jobs(self, request: Request, ns: str) -> None:
        if request.query.get("watch") == "true":
            self._watch_jobs(request, ns)
            return
        c = self.world.controller
        with self.world._cond:
            items = [
                copy.deepcopy(j)
                for (n, _), j in self.world.jobs.items()
                if n == ns and self._job_selected(j, request.query)
            ]
            rv = str(self.world._current_rv)
        self.send_json(
            200,
            {
                "kind": f"{c.kind}List",
                "apiVersion": f"{c.group}/{c.version}",
                "metadata": {"resourceVersion": rv},
                "items": items,
            },
        )

    @staticmethod
    def _job_selected(job: dict[str, Any], query: dict[str, str]) -> bool:
        field_selector = query.get("fieldSelector", "")
        if field_selector and field_selector != f"metadata.name={job['metadata']['name']}":
            return False
        return _matches(job["metadata"].get("labels") or {}, query.get("labelSelector", ""))

    def _watch_jobs(self, request: Request, ns: str) -> None:
        world = self.world
        with world._cond:
            fault = world._watch_faults.popleft() if world._watch_faults else {}
        self._start_stream("application/json")
        if fault.get("gone"):
            self._chunk(
                json.dumps(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "reason": "Expired",
                            "code": 410,
                            "message": f"too old resource version: {request.query.get('resourceVersion')}",
                        },
                    }
                ).encode()
                + b"\n"
            )
            self._end_stream()
            return
        cursor = int(request.query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds") or 300)
        sent = 0
        while True:
            with world._cond:
                pending = [
                    (rv, t, o)
                    for rv, n, t, o in world._events
                    if rv > cursor and n == ns and self._job_selected(o, request.query)
                ]
                if not pending and not world._closing and time.monotonic() < deadline:
                    # Bounded so that a client gone away is noticed; not a scenario clock.
                    world._cond.wait(0.2)
                    continue
                closing = world._closing
            try:
                for rv, event_type, obj in pending:
                    self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
                    cursor = rv
                    sent += 1
                    if fault.get("drop_after") is not None and sent >= fault["drop_after"]:
                        self._cut()
                        return
                if closing or time.monotonic() >= deadline:
                    self._end_stream()
                    return
            except OSError:
                return  # the launcher closed the watch

    def _get_job(self, request: Request, ns: str, name: str) -> None:
        job = self.world.job(name, ns)
        if job is None:
            self._object_status(404, "NotFound", name, "not found")
        else:
            self.send_json(200, job)

    def _delete_job(self, request: Request, ns: str, name: str) -> None:
        c = self.world.controller
        if self.world.delete_job(ns, name):
            self.send_json(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Success",
                    "details": {"name": name, "group": c.group, "kind": c.plural},
                },
            )
        else:
            self._object_status(404, "NotFound", name, "not found")

    def _list_workloads(self, request: Request, v: str, ns: str) -> None:
        if not self.world.kueue_installed or v != self.world.kueue_version:
            self._not_found()
            return
        with self.world._cond:
            items = [
                copy.deepcopy(w)
                for (n, _), w in self.world.workloads.items()
                if n == ns and _matches(w["metadata"]["labels"], request.query.get("labelSelector", ""))
            ]
            rv = str(self.world._current_rv)
        self.send_json(
            200,
            {
                "kind": "WorkloadList",
                "apiVersion": f"kueue.x-k8s.io/{v}",
                "metadata": {"resourceVersion": rv},
                "items": items,
            },
        )

    def _get_localqueue(self, request: Request, v: str, ns: str, name: str) -> None:
        if not self.world.kueue_installed or v != self.world.kueue_version:
            self._not_found()
        elif (ns, name) in self.world.local_queues:
            # The reason and message of Kueue 0.19's LocalQueue controller.
            condition = dict(
                type="Active", status="True", reason="Ready", message="Can submit new workloads to localQueue"
            )
            self.send_json(
                200,
                {
                    "kind": "LocalQueue",
                    "apiVersion": f"kueue.x-k8s.io/{v}",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"clusterQueue": CLUSTER_QUEUE},
                    "status": {"conditions": [condition]},
                },
            )
        else:
            self._status(
                404,
                "NotFound",
                f'localqueues.kueue.x-k8s.io "{name}" not found',
                {"name": name, "group": "kueue.x-k8s.io", "kind": "localqueues"},
            )

    def _list_provisioning_requests(self, request: Request, ns: str) -> None:
        if not self.world.serves_provisioning_requests:
            self._not_found()
            return
        with self.world._cond:
            items = [copy.deepcopy(r) for (n, _), r in self.world.provisioning_requests.items() if n == ns]
        self.send_json(
            200,
            {
                "kind": "ProvisioningRequestList",
                "apiVersion": "autoscaling.x-k8s.io/v1",
                "metadata": {},
                "items": items,
            },
        )

    def _list_pods(self, request: Request, ns: str) -> None:
        with self.world._cond:
            items = [
                copy.deepcopy(p.obj)
                for (n, _), p in self.world.pods.items()
                if n == ns and _matches(p.obj["metadata"]["labels"], request.query.get("labelSelector", ""))
            ]
        self.send_json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def _pod_log(self, request: Request, ns: str, name: str) -> None:
        world = self.world
        with world._cond:
            pod = world.pods.get((ns, name))
            state = next(iter(pod.obj["status"]["containerStatuses"][0]["state"])) if pod else None
        if pod is None:
            self._status(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
            return
        if state == "waiting":
            self._status(
                400,
                "BadRequest",
                f'container "{world.controller.container}" in pod "{name}" is waiting to start: ContainerCreating',
            )
            return
        query = request.query
        if query.get("container") != world.controller.container:
            self._status(400, "BadRequest", f"container {query.get('container')} is not valid for pod {name}")
            return
        with_stamps = query.get("timestamps") == "true"
        since = query.get("sinceTime")
        since_s = calendar.timegm(time.strptime(since, "%Y-%m-%dT%H:%M:%SZ")) if since else None

        def visible(stamp: str) -> bool:
            return (
                since_s is None or calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) >= since_s
            )

        def render(stamp: str, text: str) -> bytes:
            return (f"{stamp} {text}\n" if with_stamps else f"{text}\n").encode()

        if query.get("follow") != "true":
            with world._cond:
                lines = [render(s, t) for s, t in pod.lines if visible(s)]
            if query.get("tailLines"):
                lines = lines[-int(query["tailLines"]) :]
            data = b"".join(lines)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return

        with world._cond:
            faults = world._log_faults.get(name)
            drop_after = faults.popleft() if faults else None
        self._start_stream("text/plain")
        index = sent = 0
        try:
            while True:
                with world._cond:
                    fresh = pod.lines[index:]
                    index += len(fresh)
                    running = "running" in pod.obj["status"]["containerStatuses"][0]["state"]
                    ended = not running or pod.deleted or world._closing
                    if not fresh and not ended:
                        world._cond.wait(0.2)  # bounded so that a client gone away is noticed
                        continue
                for stamp, text in fresh:
                    if not visible(stamp):
                        continue
                    self._chunk(render(stamp, text))
                    sent += 1
                    if drop_after is not None and sent >= drop_after:
                        self._cut()
                        return
                if ended:
                    self._end_stream()
                    return
        except OSError:
            return  # the launcher closed the stream
