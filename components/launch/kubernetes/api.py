"""The narrow seam between the launcher and the Kubernetes API server.

Only the calls the job supervisor needs, over plain HTTP (``requests``): custom resources by
group/version/plural (whatever the job kind), Kueue objects, pods and their logs. The same code
talks to a real API server (bearer token + cluster CA) and to the local HTTP stand-in the tests
run. Permissions needed are namespaced only (see ``cluster/``); the two cluster-level questions
(is the job kind's API installed, does the namespace exist) are asked in ways that work without
cluster-wide grants.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests

KUEUE_GROUP = "kueue.x-k8s.io"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"


@dataclass(frozen=True)
class Resource:
    """A namespaced resource type of the API, e.g. ``kubeflow.org/v1`` ``pytorchjobs``.

    Attributes:
        group: API group (``""`` for the core group).
        version: API version of the group.
        plural: The resource's plural name, as in its URL.
        kind: The object kind, as in manifests.
    """

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        """The manifests' ``apiVersion``."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None) -> str:
        """The URL path of the collection in ``namespace``, or of one object in it."""
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{root}/namespaces/{namespace}/{self.plural}"
        return f"{path}/{name}" if name else path

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}/{self.version}" if self.group else f"{self.plural}/{self.version}"


class ApiError(Exception):
    """A non-success answer from the API server, carrying its ``Status`` fields.

    Attributes:
        status: HTTP status code.
        reason: ``Status.reason`` (e.g. ``NotFound``, ``AlreadyExists``), or the HTTP reason.
        message: ``Status.message`` or the response text.
        details: ``Status.details`` (``kind``, ``name``, ``causes``), possibly empty.
    """

    def __init__(self, status: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.details = details or {}

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @classmethod
    def from_response(cls, resp: requests.Response) -> ApiError:
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if isinstance(body, dict) and body.get("kind") == "Status":
            return cls.from_status(body, default_status=resp.status_code)
        return cls(resp.status_code, resp.reason or "", resp.text.strip()[:500])

    @classmethod
    def from_status(cls, status: dict[str, Any], default_status: int = 500) -> ApiError:
        code = int(status.get("code") or default_status)
        error_cls = WatchExpired if code == 410 else cls
        return error_cls(code, status.get("reason", ""), status.get("message", ""), status.get("details"))


class WatchExpired(ApiError):
    """410 Gone: the watch's resourceVersion is older than the server keeps; relist, then rewatch."""


@dataclass
class WatchEvent:
    """One event of a watch stream: ``type`` is ADDED, MODIFIED, DELETED or BOOKMARK."""

    type: str
    object: dict[str, Any]

    @property
    def resource_version(self) -> str | None:
        return (self.object.get("metadata") or {}).get("resourceVersion")


class LineStream:
    """Lines of a streaming response (a watch or a followed log), closable from another thread.

    Iterating yields ``bytes`` lines without the newline. :meth:`close` makes a blocked iteration
    end (with ``requests`` raising a connection error or the iteration stopping), which is how
    the launcher stops followers on cancellation.
    """

    def __init__(self, response: requests.Response, keep_partial_last_line: bool):
        self._response = response
        self._keep_partial = keep_partial_last_line
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        buffer = b""
        try:
            for chunk in self._response.iter_content(chunk_size=None):
                buffer += chunk
                while (newline := buffer.find(b"\n")) >= 0:
                    yield buffer[:newline]
                    buffer = buffer[newline + 1 :]
            # A partial line at a clean end is real output (a log without a final newline); a
            # partial line at a dropped connection is discarded by the exception skipping this.
            if buffer and self._keep_partial:
                yield buffer
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        raw = self._response.raw
        # close() alone does not wake a thread blocked reading the socket; shutdown() does.
        shutdown = getattr(raw, "shutdown", None)
        if shutdown is not None:
            # RuntimeError: already finished and released to the pool, so nothing is left to wake.
            with contextlib.suppress(OSError, RuntimeError):
                shutdown()
        self._response.close()

    def __enter__(self) -> LineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WatchStream:
    """A watch as :class:`WatchEvent` objects; an in-stream 410 raises :class:`WatchExpired`."""

    def __init__(self, lines: LineStream):
        self._lines = lines

    def __iter__(self) -> Iterator[WatchEvent]:
        for raw in self._lines:
            if not raw.strip():
                continue
            event = json.loads(raw)
            if event.get("type") == "ERROR":
                raise ApiError.from_status(event.get("object") or {})
            yield WatchEvent(event["type"], event.get("object") or {})

    def close(self) -> None:
        self._lines.close()


class KubernetesApi:
    """Exactly the Kubernetes calls the job supervisor makes.

    Args:
        base_url: API server URL, e.g. ``https://10.0.0.1:443`` or ``http://127.0.0.1:PORT``.
        token: A static bearer token, if any.
        token_provider: Called before each request for a fresh bearer token (GKE tokens expire
            hourly and in-cluster tokens rotate, while a run can wait a day for capacity).
        verify: ``requests`` TLS verification: ``True``, ``False`` or a CA bundle path (used as
            given, whatever the environment's ``REQUESTS_CA_BUNDLE`` says).
        kueue_version: Kueue API version used for Workloads and LocalQueues; ``None`` asks the
            server for its preferred version (Kueue 0.15+ prefers v1beta2, older ones v1beta1).
        request_timeout_s: Connect/read timeout of non-streaming calls.
        stream_read_timeout_s: Longest silence tolerated on a log stream before it counts as
            dropped (the launcher then reconnects).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        token_provider: Callable[[], str] | None = None,
        verify: bool | str = True,
        kueue_version: str | None = None,
        request_timeout_s: float = 30.0,
        stream_read_timeout_s: float = 600.0,
    ):
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._token_provider = token_provider
        self._verify = verify
        self._kueue_version = kueue_version
        self.request_timeout_s = request_timeout_s
        self.stream_read_timeout_s = stream_read_timeout_s
        # requests.Session is not documented as thread-safe; the launcher watches, follows logs
        # and polls from different threads, so each thread gets its own connection pool.
        self._local = threading.local()

    # -- plumbing -----------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
        return session

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One HTTP call with the bearer token and the configured TLS verification.

        ``verify`` goes with every call, not on the session: ``requests`` lets
        ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` replace a session's CA, which would make
        the cluster's own CA fail verification; an explicit per-call value is never replaced.
        Proxies still come from the environment.
        """
        return self._session().request(
            method, self.base_url + path, headers=self.request_headers(), verify=self._verify, **kwargs
        )

    def request_headers(self) -> dict[str, str]:
        """Headers for the next request, with a fresh bearer token when a provider is set."""
        headers = {"Accept": "application/json"}
        token = self._token_provider() if self._token_provider else self._token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None
    ) -> dict[str, Any]:
        resp = self._send(method, path, params=params, json=body, timeout=self.request_timeout_s)
        if not resp.ok:
            raise ApiError.from_response(resp)
        return resp.json() if resp.content else {}

    def _stream(
        self, path: str, params: dict[str, Any], read_timeout_s: float, keep_partial_last_line: bool
    ) -> LineStream:
        resp = self._send(
            "GET", path, params=params, stream=True, timeout=(self.request_timeout_s, read_timeout_s)
        )
        if not resp.ok:
            try:
                raise ApiError.from_response(resp)
            finally:
                resp.close()
        return LineStream(resp, keep_partial_last_line)

    # -- custom resources ---------------------------------------------------------------------

    def serves(self, resource: Resource) -> bool:
        """Whether the API server serves ``resource`` (its CRD is installed at that version).

        Asked through API discovery, which every authenticated identity may read, rather than
        by reading the CRD object, which would need a cluster-wide grant.
        """
        try:
            listing = self._request("GET", f"/apis/{resource.group}/{resource.version}")
        except ApiError as e:
            if e.not_found:
                return False
            raise
        return any(r.get("name") == resource.plural for r in listing.get("resources", []))

    def namespace_exists(self, namespace: str) -> bool | None:
        """Whether the namespace exists; ``None`` when this identity may not read namespaces.

        The launcher's Role is namespaced, so on a real cluster the answer is usually ``None``
        and a missing namespace shows up as the create call's 404 instead.
        """
        try:
            self._request("GET", f"/api/v1/namespaces/{namespace}")
        except ApiError as e:
            if e.not_found:
                return False
            if e.status == 403:
                return None
            raise
        return True

    def create(self, resource: Resource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Creates an object; unknown or duplicate fields are errors (``fieldValidation=Strict``)."""
        return self._request(
            "POST", resource.path(namespace), params={"fieldValidation": "Strict"}, body=body
        )

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        """The object; raises :class:`ApiError` (404) when it does not exist."""
        return self._request("GET", resource.path(namespace, name))

    def list(
        self,
        resource: Resource,
        namespace: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> dict[str, Any]:
        """The list object (its ``metadata.resourceVersion`` is where a watch resumes)."""
        params = {
            k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v
        }
        return self._request("GET", resource.path(namespace), params=params)

    def delete(
        self, resource: Resource, namespace: str, name: str, propagation_policy: str = "Background"
    ) -> bool:
        """Deletes an object and, through garbage collection, what it owns (pods, services).

        Args:
            resource: What kind of object.
            namespace: Its namespace.
            name: Its name.
            propagation_policy: ``Background`` removes the object at once and lets the collector
                delete its dependents after; ``Foreground`` keeps it visible until they are gone.

        Returns:
            False when the object was already gone.
        """
        try:
            self._request(
                "DELETE", resource.path(namespace, name), params={"propagationPolicy": propagation_policy}
            )
        except ApiError as e:
            if e.not_found:
                return False
            raise
        return True

    def watch(
        self,
        resource: Resource,
        namespace: str,
        *,
        resource_version: str,
        field_selector: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> WatchStream:
        """Watches objects from ``resource_version`` on.

        The server ends the stream after ``timeout_seconds``; the caller rewatches from the last
        resourceVersion it saw. Bookmarks are requested so that the resourceVersion keeps moving
        even when the watched object does not change.
        """
        params: dict[str, Any] = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(timeout_seconds)),
        }
        if field_selector:
            params["fieldSelector"] = field_selector
        if label_selector:
            params["labelSelector"] = label_selector
        lines = self._stream(
            resource.path(namespace),
            params,
            read_timeout_s=timeout_seconds + 30,
            keep_partial_last_line=False,
        )
        return WatchStream(lines)

    # -- Kueue ----------------------------------------------------------------------------------

    def kueue_api_version(self) -> str | None:
        """The Kueue API version in use (asked once through discovery); ``None``: Kueue is not installed."""
        if self._kueue_version is None:
            try:
                group = self._request("GET", f"/apis/{KUEUE_GROUP}")
            except ApiError as e:
                if e.not_found:
                    return None
                raise
            self._kueue_version = (group.get("preferredVersion") or {}).get("version") or "v1beta1"
        return self._kueue_version

    def _kueue_path(self, namespace: str, plural: str) -> str:
        version = self.kueue_api_version()
        if version is None:
            raise ApiError(404, "NotFound", f"the {KUEUE_GROUP} API is not served: Kueue is not installed")
        return f"/apis/{KUEUE_GROUP}/{version}/namespaces/{namespace}/{plural}"

    def list_workloads(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        """The Kueue Workloads that Kueue created for the job with this uid."""
        return self._request(
            "GET",
            self._kueue_path(namespace, "workloads"),
            params={"labelSelector": f"{JOB_UID_LABEL}={job_uid}"},
        ).get("items", [])

    def get_localqueue(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The LocalQueue, or ``None`` when it does not exist (a 404 naming it, not a missing API)."""
        try:
            return self._request("GET", f"{self._kueue_path(namespace, 'localqueues')}/{name}")
        except ApiError as e:
            if e.not_found and e.details.get("name") == name:
                return None
            raise

    # -- pods and logs ------------------------------------------------------------------------------

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Pods matching the label selector."""
        return self._request(
            "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": label_selector}
        ).get("items", [])

    def read_pod_log(
        self,
        namespace: str,
        pod: str,
        container: str,
        *,
        tail_lines: int | None = None,
        previous: bool = False,
    ) -> str:
        """A container's log so far (not followed)."""
        params: dict[str, Any] = {"container": container}
        if tail_lines is not None:
            params["tailLines"] = str(tail_lines)
        if previous:
            params["previous"] = "true"
        resp = self._send(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods/{pod}/log",
            params=params,
            timeout=self.request_timeout_s,
        )
        if not resp.ok:
            raise ApiError.from_response(resp)
        return resp.text

    def stream_pod_log(
        self,
        namespace: str,
        pod: str,
        container: str,
        *,
        follow: bool = True,
        since_time: str | None = None,
        timestamps: bool = True,
    ) -> LineStream:
        """A container's log as a line stream, followed while the container runs.

        With ``timestamps`` every line starts with its RFC 3339 (nanosecond) timestamp and a
        space, which is what lets a reconnect with ``since_time`` (whole seconds) skip the lines
        already seen.
        """
        params: dict[str, Any] = {"container": container}
        if follow:
            params["follow"] = "true"
        if timestamps:
            params["timestamps"] = "true"
        if since_time:
            params["sinceTime"] = since_time
        return self._stream(
            f"/api/v1/namespaces/{namespace}/pods/{pod}/log",
            params,
            read_timeout_s=self.stream_read_timeout_s,
            keep_partial_last_line=True,
        )
