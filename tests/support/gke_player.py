"""What GKE does around a job, played by a test against the real control plane.

The real controllers (Kueue, JobSet, Trainer, the Training Operator, the scheduler) do their own
part; this plays what has no controller here: the cluster autoscaler answering Kueue's
ProvisioningRequest (DWS), the containers ending (kwok's pods run until told), and their logs
(files kwok serves). Also the launcher under test, run in a thread or as its own process.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.launch.kubernetes.api import KubernetesApi
from components.launch.kubernetes.kinds import JobConfig, JobKind, job_name_for
from components.launch.kubernetes.supervisor import run_job
from tests.support import ROOT
from tests.support.control_plane import (
    EXIT_CODE_ANNOTATION,
    EXIT_REASON_ANNOTATION,
    ControlPlane,
    Kube,
)

NAMESPACE = "batch-inference"
LAUNCHER_SA = "batch-inference-launcher"
KUEUE = "kueue.x-k8s.io/v1beta2"
PROVREQ = "autoscaling.x-k8s.io/v1"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"


def cluster_job_config(run_id: str, **overrides: Any) -> JobConfig:
    """A 2-node x 8-GPU job of run ``run_id`` on the cluster/ setup, as the launch step makes it."""
    results = f"gs://results/runs/{run_id}"
    values = dict(
        name=job_name_for(run_id, results),
        image="registry.example/batch-inference-worker:test",
        worker_args=["--input", "gs://images/coco", "--output", results],
        results_uri=results,
        namespace=NAMESPACE,
        nodes=2,
        gpus_per_node=8,
        queue="dws-local-queue",
    )
    return JobConfig(**{**values, **overrides})


class SteppedClock:
    """A monotonic clock a test can move forward: how a test makes a timeout happen now."""

    def __init__(self) -> None:
        self._real = time.monotonic
        self.offset = 0.0

    def __call__(self) -> float:
        return self._real() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Launcher:
    """``run_job`` in a thread, its log lines collected; ``result()`` returns or raises what it did."""

    api: KubernetesApi
    kind: JobKind
    manifest: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def start(self) -> Launcher:
        self._done: queue.Queue = queue.Queue()
        self._changed = threading.Condition()
        options = dict(
            poll_interval_s=1.0, retry_interval_s=0.3, log_drain_timeout_s=10.0, deletion_wait_s=60.0
        )
        options.update(self.options)

        def log(line: str) -> None:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

        def body() -> None:
            try:
                self._done.put(
                    (
                        "ok",
                        run_job(self.api, self.kind, self.manifest, log=log, handle_sigterm=False, **options),
                    )
                )
            except BaseException as e:  # handed to the test's thread
                self._done.put(("error", e))

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def job_uid(self, gke: Gke, name: str) -> str:
        try:
            return gke.job_uid(self.kind, name, self.running)
        except AssertionError:
            raise self.error(timeout_s=1) from None

    def wait_for_line(self, predicate: Callable[[str], bool] | str, timeout_s: float = 60.0) -> str:
        """The first log line matching (a substring or a predicate), waiting for it to be logged."""
        test = (lambda line: predicate in line) if isinstance(predicate, str) else predicate
        with self._changed:
            found = self._changed.wait_for(
                lambda: next((x for x in self.lines if test(x)), None) or not self._thread.is_alive(),
                timeout_s,
            )
            match = next((x for x in self.lines if test(x)), None)
        if match is None:
            tail = "\n".join(self.lines[-40:])
            state = "the launcher ended" if found else f"nothing in {timeout_s:g}s"
            raise AssertionError(f"no launcher line matching {predicate!r} ({state}); its log:\n{tail}")
        return match

    def result(self, timeout_s: float = 120.0) -> Any:
        status, value = self._done.get(timeout=timeout_s)
        if status == "error":
            raise value
        return value

    def error(self, timeout_s: float = 120.0) -> BaseException:
        status, value = self._done.get(timeout=timeout_s)
        assert status == "error", f"the launcher succeeded: {value}"
        return value


class LauncherProcess:
    """The launcher as the KFP task runs it: its own process, in-cluster credentials, SIGTERM to cancel."""

    def __init__(self, plane: ControlPlane, token: str, kind: str, manifest: dict[str, Any], workdir: Path):
        sa_dir = workdir / "serviceaccount"
        sa_dir.mkdir(parents=True, exist_ok=True)
        (sa_dir / "token").write_text(token)
        (sa_dir / "ca.crt").write_bytes(plane.pki.ca_cert.read_bytes())
        spec = workdir / "job.json"
        spec.write_text(json.dumps({"kind": kind, "manifest": manifest, "sa_dir": str(sa_dir)}))
        self.log_path = workdir / "launcher.log"
        env = {
            **os.environ,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": plane.url.rsplit(":", 1)[1],
        }
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.gke_player", str(spec)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, kube: Kube, timeout_s: float = 60.0) -> None:
        kube.wait_for(
            f"{text!r} in the launcher's output",
            lambda: text in self.output or self.proc.poll() is not None,
            timeout_s,
        )
        assert text in self.output, (
            f"the launcher exited ({self.proc.returncode}) without {text!r}:\n{self.output[-3000:]}"
        )

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Gke:
    """The parts of GKE a test plays, through an admin client of the real control plane."""

    def __init__(self, plane: ControlPlane, kube: Kube):
        self.plane, self.kube = plane, kube

    # Kueue and DWS ----------------------------------------------------------------------------

    def workloads(self, job_uid: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return self.kube.list(KUEUE, "Workload", namespace, labelSelector=f"{JOB_UID_LABEL}={job_uid}")

    def job_uid(
        self, kind: JobKind, name: str, launcher_running: Callable[[], bool], namespace: str = NAMESPACE
    ) -> str:
        """The uid of the job the launcher creates; fails at once, with its output, if the launcher ends first."""

        def created() -> dict[str, Any] | str | None:
            job = self.kube.find(kind.resource.api_version, kind.resource.kind, name, namespace)
            return job or (None if launcher_running() else "ended")

        job = self.kube.wait_for(f"{name} created", created)
        if job == "ended":
            raise AssertionError(f"the launcher ended before {kind.resource.kind} {name} existed")
        return job["metadata"]["uid"]

    def provisioning_requests(self, job_uid: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        owners = {w["metadata"]["uid"] for w in self.workloads(job_uid, namespace)}
        return [
            pr
            for pr in self.kube.list(PROVREQ, "ProvisioningRequest", namespace)
            if any(o.get("uid") in owners for o in pr["metadata"].get("ownerReferences") or [])
        ]

    def pending_provisioning_request(self, job_uid: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        """Waits for Kueue to ask DWS for the job's nodes (a ProvisioningRequest not yet answered)."""

        def unanswered() -> dict[str, Any] | None:
            for pr in self.provisioning_requests(job_uid, namespace):
                types = {c["type"] for c in (pr.get("status") or {}).get("conditions") or []}
                if not types & {"Provisioned", "Failed"}:
                    return pr
            return None

        return self.kube.wait_for("a ProvisioningRequest from Kueue", unanswered)

    def answer(self, request: dict[str, Any], condition: str, reason: str, message: str) -> None:
        """Sets the request's conditions as the cluster autoscaler does (Accepted, then ``condition``)."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "ProvisioningRequest accepted",
                "lastTransitionTime": now,
            },
            {
                "type": condition,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
            },
        ]
        meta = request["metadata"]
        self.kube.merge_patch(
            PROVREQ,
            "ProvisioningRequest",
            meta["name"],
            meta["namespace"],
            {"status": {"conditions": conditions}},
            subresource="status",
        )

    def provision(self, job_uid: str, namespace: str = NAMESPACE) -> None:
        request = self.pending_provisioning_request(job_uid, namespace)
        self.answer(
            request, "Provisioned", "Provisioned", "Provisioning Request was successfully provisioned."
        )

    # pods -----------------------------------------------------------------------------------------

    def pods(self, selector: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return self.kube.list("v1", "Pod", namespace, labelSelector=selector)

    def running_pods(
        self,
        selector: str,
        count: int,
        namespace: str = NAMESPACE,
        timeout_s: float = 90.0,
        where: Callable[[dict[str, Any]], bool] = lambda pod: True,
    ) -> list[dict[str, Any]]:
        """Waits until ``count`` live pods of the selector run on (fake) nodes."""

        def running() -> list[dict[str, Any]] | None:
            pods = [
                p
                for p in self.pods(selector, namespace)
                if not p["metadata"].get("deletionTimestamp")
                and p["status"].get("phase") == "Running"
                and where(p)
            ]
            return sorted(pods, key=lambda p: p["metadata"]["name"]) if len(pods) == count else None

        return self.kube.wait_for(f"{count} running pods of {selector}", running, timeout_s)

    def write_log(self, pod: dict[str, Any], container: str, lines: list[str]) -> Path:
        """Lines the container printed (kwok serves them, followed as the file grows)."""
        meta = pod["metadata"]
        path = self.plane.kwok_logs / f"{meta['namespace']}-{meta['name']}-{meta['uid']}.log"
        # The container runtime's log format (CRI), which kwok parses as the kubelet does.
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with open(path, "a") as f:
            f.writelines(f"{stamp} stdout F {line}\n" for line in lines)
        self.plane.serve_pod_log(meta["namespace"], meta["name"], container, path)
        return path

    def end(self, pod: dict[str, Any], exit_code: int, reason: str | None = None) -> None:
        """The container exits with ``exit_code`` (kwok's pod-exit stage sets the status)."""
        annotations = {EXIT_CODE_ANNOTATION: str(exit_code)}
        if reason:
            annotations[EXIT_REASON_ANNOTATION] = reason
        meta = pod["metadata"]
        self.kube.merge_patch(
            "v1", "Pod", meta["name"], meta["namespace"], {"metadata": {"annotations": annotations}}
        )

    def gone(self, kind: JobKind, name: str, namespace: str = NAMESPACE, timeout_s: float = 90.0) -> None:
        """Waits until the job, the JobSet a TrainJob runs as, and every pod they made no longer exist."""

        def found(api_version: str, kind_name: str) -> bool:
            return self.kube.find(api_version, kind_name, name, namespace) is not None

        self.kube.wait_for(
            f"{kind.resource.kind} {name}, its children and its pods gone",
            lambda: (
                not found(kind.resource.api_version, kind.resource.kind)
                and not found("jobset.x-k8s.io/v1alpha2", "JobSet")
                and not self.pods(kind.pod_selector(name), namespace)
            ),
            timeout_s,
        )


def _main(spec_path: str) -> int:
    """The launcher process of :class:`LauncherProcess` (what the KFP launch task runs)."""
    from components.launch.kubernetes.credentials import in_cluster_api
    from components.launch.kubernetes.errors import LauncherError
    from components.launch.kubernetes.kinds import job_kind

    spec = json.loads(Path(spec_path).read_text())
    api = in_cluster_api(spec["sa_dir"])
    try:
        run_job(api, job_kind(spec["kind"]), spec["manifest"], poll_interval_s=1.0, retry_interval_s=0.3)
    except LauncherError as e:
        print(f"launcher error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
