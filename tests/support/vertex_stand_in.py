"""A stand-in for the Vertex AI Pipelines REST API (v1) on 127.0.0.1, for the submit tests.

It is not Vertex AI: it serves the three calls google-cloud-aiplatform makes to create a
pipeline job, read it back, and create a schedule, over the REST transport
(``aiplatform.init(api_endpoint=stand_in.url, api_transport="rest")``). It records each body,
names the created resources the way Vertex does, and reports ``final_state`` for every job.
"""

from __future__ import annotations

import itertools
import re
import threading
from urllib.parse import urlparse

from tests.support.http_stand_in import LoopbackServer, QuietHandler, forwarding_handler

_COLLECTION = re.compile(r"/v1/projects/([^/]+)/locations/([^/]+)/(pipelineJobs|schedules)(?:/([^/]+))?")


class VertexApiStandIn:
    """``with VertexApiStandIn() as vertex: vertex.url``; created resources in ``jobs`` and ``schedules``."""

    def __init__(self, *, final_state: str = "PIPELINE_STATE_SUCCEEDED"):
        self.final_state = final_state
        self.jobs: dict[str, dict] = {}
        self.schedules: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> VertexApiStandIn:
        self._server = LoopbackServer(forwarding_handler(self), "vertex-stand-in")
        self.url = self._server.url
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    def _handle(self, h: QuietHandler, method: str) -> None:
        body = h.read_json(empty={})
        match = _COLLECTION.fullmatch(urlparse(h.path).path)
        with self._lock:
            status, answer = self._route(method, match, body) if match else (404, {})
        h.send_json(status, answer)

    def _route(self, method: str, match: re.Match, body: dict) -> tuple[int, dict]:
        project, location, collection, resource_id = match.groups()
        if method == "POST" and resource_id is None:
            store = self.jobs if collection == "pipelineJobs" else self.schedules
            new_id = f"{collection.lower()}-{next(self._ids)}"
            resource = {**body, "name": f"projects/{project}/locations/{location}/{collection}/{new_id}"}
            if collection == "pipelineJobs":
                resource["state"] = "PIPELINE_STATE_PENDING"
            else:
                resource["state"] = "ACTIVE"
            store[new_id] = resource
            return 200, resource
        if method == "GET" and collection == "pipelineJobs" and resource_id in self.jobs:
            return 200, {**self.jobs[resource_id], "state": self.final_state}
        return 404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}
