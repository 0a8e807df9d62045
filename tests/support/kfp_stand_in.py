"""A stand-in for the Kubeflow Pipelines REST API (v2beta1) on 127.0.0.1, for the submit tests.

It is not KFP: it serves the handful of endpoints ``kfp.Client`` calls to check health, find
or create an experiment, create a run or a recurring run and follow a run, answers in the
API's JSON shapes, and records every request so a test can check what the client sent. It
applies the server-side checks a test relies on (a bearer token when configured, a known
experiment, KFP's 6-field cron) and answers errors in the API's error shape.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

from tests.support.http_stand_in import LoopbackServer, QuietHandler, forwarding_handler

API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict
    body: dict | None


class KfpApiStandIn:
    """``with KfpApiStandIn() as kfp: kfp.url``; ``kfp.requests`` lists what arrived."""

    def __init__(self, *, token: str | None = None, final_state: str = "SUCCEEDED"):
        self.token = token
        self.final_state = final_state
        self.requests: list[Request] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> KfpApiStandIn:
        self._server = LoopbackServer(forwarding_handler(self), "kfp-stand-in")
        self.url = self._server.url
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == API + path]

    def _handle(self, h: QuietHandler, method: str) -> None:
        url = urlparse(h.path)
        body = h.read_json()
        with self._lock:
            self.requests.append(Request(method, url.path, parse_qs(url.query), body))
            if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
                status, answer = 401, _error(16, "Unauthenticated: no valid bearer token")
            else:
                status, answer = self._route(method, url.path, parse_qs(url.query), body)
        h.send_json(status, answer)

    def _route(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False, "commit_sha": "stand-in", "tag_name": "2.5.0"}
        if (method, path) == ("GET", f"{API}/experiments"):
            wanted = [
                p["stringValue"]
                for p in json.loads(query.get("filter", ["{}"])[0]).get("predicates", [])
                if p.get("key") == "display_name"
            ]
            found = [e for e in self.experiments.values() if not wanted or e["display_name"] in wanted]
            return 200, ({"experiments": found, "total_size": len(found)} if found else {})
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment = {**body, "experiment_id": f"exp-{next(self._ids)}", "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if (method, path) == ("POST", f"{API}/runs"):
            if body.get("experiment_id") not in self.experiments:
                return 404, _error(5, f"experiment {body.get('experiment_id')} not found")
            run = {**body, "run_id": f"run-{next(self._ids)}", "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
        if method == "GET" and (match := re.fullmatch(f"{API}/runs/([^/]+)", path)):
            run = self.runs.get(match.group(1))
            if run is None:
                return 404, _error(5, "run not found")
            return 200, {**run, "state": self.final_state}
        if (method, path) == ("POST", f"{API}/recurringruns"):
            cron = body.get("trigger", {}).get("cron_schedule", {}).get("cron", "")
            if len(cron.split()) != 6:  # KFP's scheduler parses 6-field cron, seconds first
                return 400, _error(3, f"invalid cron {cron!r}: expected 6 fields")
            recurring = {**body, "recurring_run_id": f"rr-{next(self._ids)}", "status": "ENABLED"}
            self.recurring_runs[recurring["recurring_run_id"]] = recurring
            return 200, recurring
        return 404, _error(5, f"the stand-in has no {method} {path}")


def _error(code: int, message: str) -> dict:
    return {"error": message, "code": code, "message": message, "details": []}
