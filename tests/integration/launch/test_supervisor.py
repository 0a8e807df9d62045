"""The job supervisor against a local HTTP stand-in for the Kubernetes API server.

The launcher, its HTTP seam, sockets, threads and the SIGTERM path are real; only the API server
(and the controllers behind it) is played by ``tests/support/k8s_stand_in.py``. Each test scripts what
the cluster does in response to what the launcher asks, then checks what the launcher did to
the API (creates, deletes, watch resumption) and what it logged.
"""

from __future__ import annotations

import itertools
import os
import signal

import pytest

from components.launch.kubernetes.api import KubernetesApi
from components.launch.kubernetes.credentials import in_cluster_api
from components.launch.kubernetes.errors import (
    AdmissionRejected,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    LauncherError,
    MissingClusterResource,
)
from components.launch.kubernetes.kinds import RESULTS_HASH_LABEL, JobConfig, job_name_for, results_hash
from components.launch.kubernetes.pytorchjob import KIND
from components.launch.kubernetes.supervisor import run_job
from tests.support.k8s_stand_in import KubeApiStandIn, Step, followed_log_of, listed_workloads
from worker.config import WorkerConfig

NS = "batch-inference"
RESULTS = "gs://results-bucket/runs/coco-val2017"
JOBS = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"

pytestmark = pytest.mark.timeout(60)


class CollectedLog(list):
    """The launcher's ``log`` callable, keeping every line for assertions."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def count(self, needle: str) -> int:  # type: ignore[override]
        return sum(needle in line for line in self)

    def has(self, needle: str) -> bool:
        return self.count(needle) > 0


def make_manifest(run_id: str = "run-1", results: str = RESULTS, **overrides) -> dict:
    worker = WorkerConfig(
        input="gs://images/coco/val2017", output=results, model="google/vit-base-patch16-224"
    )
    cfg = JobConfig(
        name=job_name_for(run_id, results),
        image="us-docker.pkg.dev/p/r/worker:1",
        worker_args=worker.to_args(),
        namespace=NS,
        results_uri=results,
        **overrides,
    )
    return KIND.build(cfg)


@pytest.fixture
def stand_in():
    with KubeApiStandIn() as server:
        yield server
    assert not server.step_errors, server.step_errors


def launch(stand_in: KubeApiStandIn, manifest: dict, log: CollectedLog, **kwargs):
    api = KubernetesApi(stand_in.url, token="test-token", request_timeout_s=10, stream_read_timeout_s=20)
    # Short intervals keep the test fast; the 30 s timeout is only a safety net against a hang.
    options = dict(timeout_s=30, poll_interval_s=0.05, retry_interval_s=0.02, log_drain_timeout_s=10)
    options.update(kwargs)
    return run_job(api, KIND, manifest, log=log, **options)


def master(name: str) -> str:
    return f"{name}-master-0"


def test_queued_job_reports_dws_wait_then_streams_master_log_and_succeeds(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(
                    name,
                    "master",
                    0,
                    ["loading model", "shard 0 committed", "done: 5000 images"],
                    state="terminated",
                ),
                s.add_pod(name, "worker", 0, ["worker up"], state="terminated"),
            ),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: s.finish(
                name, "Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed."
            ),
        ),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    assert outcome.name == name and not outcome.adopted
    assert outcome.log_tail == ["loading model", "shard 0 committed", "done: 5000 images"]
    creates = stand_in.calls("POST", JOBS)
    assert len(creates) == 1 and creates[0].query == {"fieldValidation": "Strict"}
    assert creates[0].body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "dws-local-queue"
    assert stand_in.calls("DELETE") == []
    # The queue report names the DWS admission check, its state and its message.
    assert log.has("Suspended")
    assert log.has("admission checks: dws-prov: Pending (Waiting for resources.")
    assert log.has("QuotaReserved=True")
    assert log.has("was admitted by Kueue")
    for line in ("loading model", "shard 0 committed", "done: 5000 images"):
        assert log.count(f"[master-0] {line}") == 1, log
    assert not log.has("worker up")  # only the master's log is followed
    assert log.index(
        f"PyTorchJob {NS}/{name}: Running (PyTorchJobRunning: PyTorchJob is running.)"
    ) < log.index("[master-0] loading model")
    pod_list = stand_in.calls("GET", f"/namespaces/{NS}/pods")[0]
    assert pod_list.query["labelSelector"] == (
        f"training.kubeflow.org/job-name={name},"
        "training.kubeflow.org/replica-type=master,"
        "training.kubeflow.org/replica-index=0"
    )
    workload_list = stand_in.calls("GET", "/workloads")[0]
    assert workload_list.query["labelSelector"] == f"kueue.x-k8s.io/job-uid={outcome.uid}"


def test_eviction_is_reported_and_the_readmitted_job_is_followed_again(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(name, "master", 0, ["first attempt"], state="terminated", exit_code=143),
            ),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: s.evict(name, "PodsReadyTimeout", "Exceeded the PodsReady timeout default/pytorchjob"),
        ),
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(name, "master", 0, ["second attempt", "all shards done"], state="terminated"),
            ),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: s.finish(name, "Succeeded", "PyTorchJobSucceeded", "done"),
        ),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    assert outcome.log_tail[-2:] == ["second attempt", "all shards done"]
    assert len(stand_in.calls("POST", JOBS)) == 1
    assert stand_in.calls("DELETE") == []
    assert log.has("was suspended again after admission: Kueue evicted its workload")
    assert log.count("evicted: workload pytorchjob-") == 1
    assert log.has("(PodsReadyTimeout: Exceeded the PodsReady timeout")
    assert log.count("was admitted by Kueue") == 2
    for line in ("first attempt", "second attempt", "all shards done"):
        assert log.count(f"[master-0] {line}") == 1, log
    assert stand_in.steps_left() == 0


def test_job_without_a_queue_runs_without_kueue_and_reports_its_pods_while_starting(stand_in):
    manifest = make_manifest(queue=None, max_run_duration_seconds=None)
    name = manifest["metadata"]["name"]

    def start_pods(s: KubeApiStandIn) -> None:
        s.add_pod(name, "master", 0, state="waiting")
        s.add_pod(name, "worker", 0, state="waiting")

    def running(s: KubeApiStandIn) -> None:
        s.terminate_pod(f"{name}-worker-0", 0)
        s.delete_pod(master(name))
        s.add_pod(name, "master", 0, ["no queue, still fine"], state="terminated")
        s.update_job(
            name,
            lambda job: job["status"]["conditions"].append(
                {"type": "Running", "status": "True", "reason": "PyTorchJobRunning", "message": "running"}
            ),
        )

    stand_in.script(
        Step(lambda r: r.method == "POST", start_pods, at="received"),  # pods exist once the create returns
        Step(lambda r: r.path.endswith("/pods") and "replica-type" not in r.query["labelSelector"], running),
        Step(
            followed_log_of(master(name)),
            lambda s: s.finish(name, "Succeeded", "PyTorchJobSucceeded", "done"),
        ),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    assert outcome.log_tail == ["no queue, still fine"]
    assert (
        stand_in.calls("GET", "/workloads") == []
        and stand_in.calls("GET", "/localqueues/dws-local-queue") == []
    )
    assert log.has(f"starting: pods {name}-master-0 Pending (ContainerCreating), {name}-worker-0 Pending")
    assert not log.has("Suspended")


def test_failed_job_raises_with_condition_reason_and_the_failing_pods_log_tail(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]

    def fail(s: KubeApiStandIn) -> None:
        s.terminate_pod(master(name), 1, finished_at="2026-11-24T20:00:09Z")
        s.finish(
            name,
            "Failed",
            "PyTorchJobFailed",
            f"PyTorchJob {name} is failed because 1 Worker replica(s) failed.",
        )

    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(name, "master", 0, ["rank 0: reading plan", "rank 0: waiting for peers"]),
                # The worker failed first: its log, not the master's, holds the cause.
                s.add_pod(
                    name,
                    "worker",
                    0,
                    [
                        "Traceback (most recent call last):",
                        '  File "worker/run.py"',
                        "RuntimeError: NCCL error: unhandled system error",
                    ],
                    state="terminated",
                    exit_code=1,
                    finished_at="2026-11-24T20:00:05Z",
                ),
            ),
        ),
        Step(followed_log_of(master(name)), fail, at="received"),
    )
    log = CollectedLog()

    with pytest.raises(JobFailed) as failure:
        launch(stand_in, manifest, log)

    message = str(failure.value)
    assert "PyTorchJobFailed" in message and "1 Worker replica(s) failed" in message
    assert "RuntimeError: NCCL error: unhandled system error" in message
    assert f"pod {name}-worker-0" in message
    assert failure.value.reason == "PyTorchJobFailed"
    assert failure.value.log_tail[-1] == "RuntimeError: NCCL error: unhandled system error"
    tail_read = stand_in.calls("GET", f"/pods/{name}-worker-0/log")
    assert tail_read and tail_read[0].query.get("tailLines") == "50"
    assert log.count("[master-0] rank 0: waiting for peers") == 1
    # A failed job is finished, not left running: it is kept for inspection, not deleted.
    assert stand_in.calls("DELETE") == []


def test_failed_job_falls_back_to_the_streamed_master_log_when_pods_are_gone(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]

    def looks_for_failing_pods(request) -> bool:
        return request.path.endswith("/pods") and "replica-type" not in request.query.get("labelSelector", "")

    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (s.admit(name), s.add_pod(name, "master", 0, ["ValueError: bad model config"])),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: (
                s.terminate_pod(master(name), 1),
                s.finish(name, "Failed", "PyTorchJobFailed", "1 Master replica(s) failed."),
            ),
            at="received",
        ),
        # cleanPodPolicy: All has removed the pods by the time the launcher looks for the failing one.
        Step(looks_for_failing_pods, lambda s: s.delete_pod(master(name)), at="received"),
    )
    with pytest.raises(JobFailed) as failure:
        launch(stand_in, manifest, CollectedLog())

    assert "ValueError: bad model config" in str(failure.value)
    assert "master-0 (as streamed)" in str(failure.value)
    assert stand_in.steps_left() == 0


def test_timeout_while_queued_deletes_the_job_with_foreground_propagation(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    log = CollectedLog()
    # A clock that advances 10 s per reading: the 60 s timeout passes after a few loops, deterministically.
    ticks = itertools.count(0, 10)

    with pytest.raises(JobTimedOut) as timeout:
        launch(stand_in, manifest, log, timeout_s=60, poll_interval_s=0.01, clock=lambda: float(next(ticks)))

    assert "did not finish within 60s" in str(timeout.value) and "Suspended" in str(timeout.value)
    deletes = stand_in.calls("DELETE", f"{JOBS}/{name}")
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Foreground"}
    assert stand_in.job(name) is None
    assert log.count("suspended: workload pytorchjob-") >= 2  # reported at a steady interval while queued
    assert log.has(f"deleted PyTorchJob {NS}/{name} (timed out after 60s)")


def test_sigterm_while_running_deletes_the_job_and_exits(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    received = []

    def outer_handler(signum, frame):  # what the component had installed before the launcher ran
        received.append(signum)

    stand_in.script(
        Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, "master", 0, ["step 1"]))),
        # The pipeline is cancelled once the job runs: SIGTERM to this very process.
        Step(followed_log_of(master(name)), lambda s: os.kill(os.getpid(), signal.SIGTERM), at="received"),
    )
    log = CollectedLog()
    original = signal.signal(signal.SIGTERM, outer_handler)
    try:
        with pytest.raises(JobCancelled) as cancelled:
            launch(stand_in, manifest, log)
        assert signal.getsignal(signal.SIGTERM) is outer_handler  # the launcher restored the handler
    finally:
        signal.signal(signal.SIGTERM, original)

    assert cancelled.value.code == 143
    assert received == []  # the launcher's handler, not the outer one, took the signal
    deletes = stand_in.calls("DELETE", f"{JOBS}/{name}")
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Foreground"}
    assert stand_in.job(name) is None
    assert log.has("cancelled by SIGTERM") and log.has(
        f"deleted PyTorchJob {NS}/{name} (pipeline run cancelled)"
    )


def test_dropped_watch_resumes_from_the_last_resource_version(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    stand_in.fail_next_watch(drop_after_events=1)  # the admission event arrives, then the connection dies
    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (s.admit(name), s.add_pod(name, "master", 0, ["ok"], state="terminated")),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: s.finish(name, "Succeeded", "PyTorchJobSucceeded", "done"),
        ),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    watches = stand_in.watches()
    assert len(watches) >= 2
    created_rv = int(watches[0].query["resourceVersion"])
    assert watches[0].query["fieldSelector"] == f"metadata.name={name}"
    # The second watch starts right after the one event the first delivered: nothing lost, nothing replayed.
    assert int(watches[1].query["resourceVersion"]) == created_rv + 1
    assert log.has("dropped") and log.has(f"resuming from resourceVersion {created_rv + 1}")
    assert outcome.log_tail == ["ok"]
    assert len(stand_in.calls("POST", JOBS)) == 1


def test_watch_410_gone_relists_then_rewatches_from_the_list(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    stand_in.fail_next_watch(gone=True)
    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (s.admit(name), s.add_pod(name, "master", 0, ["ok"], state="terminated")),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: s.finish(name, "Succeeded", "PyTorchJobSucceeded", "done"),
        ),
    )
    log = CollectedLog()

    launch(stand_in, manifest, log)

    job_requests = [
        r for r in stand_in.requests if r.path == JOBS and r.method == "GET" and r.query.get("fieldSelector")
    ]
    first_watch, relist, second_watch = job_requests[:3]
    assert first_watch.query["watch"] == "true"
    assert "watch" not in relist.query and relist.query["fieldSelector"] == f"metadata.name={name}"
    assert second_watch.query["watch"] == "true"
    assert int(second_watch.query["resourceVersion"]) >= int(first_watch.query["resourceVersion"])
    assert log.has("expired (410 Gone); relisting")


def test_dropped_log_stream_reconnects_without_duplicating_or_losing_lines(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    shared_stamp = "2026-11-24T20:00:00.500000000Z"

    def admit_with_log(s: KubeApiStandIn) -> None:
        s.admit(name)
        s.add_pod(
            name,
            "master",
            0,
            [
                "line 1",
                ("2026-11-24T20:00:00.400000000Z", "line 2"),
                (shared_stamp, "line 3a"),
                (shared_stamp, "line 3b"),
                ("2026-11-24T20:00:00.600000000Z", "line 4"),
            ],
        )
        s.drop_next_log_stream(master(name), after_lines=3)  # cut between the two lines sharing a stamp

    def finish(s: KubeApiStandIn) -> None:
        s.append_log(master(name), ("2026-11-24T20:00:01.000000000Z", "line 5"))
        s.terminate_pod(master(name), 0)
        s.finish(name, "Succeeded", "PyTorchJobSucceeded", "done")

    stand_in.script(
        Step(listed_workloads, admit_with_log),
        Step(lambda r: followed_log_of(master(name))(r) and "sinceTime" in r.query, finish, at="received"),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    expected = ["line 1", "line 2", "line 3a", "line 3b", "line 4", "line 5"]
    assert [line[len("[master-0] ") :] for line in log if line.startswith("[master-0] ")] == expected
    assert outcome.log_tail == expected
    streams = stand_in.calls("GET", f"/pods/{master(name)}/log", follow="true")
    assert "sinceTime" not in streams[0].query
    assert (
        streams[1].query["sinceTime"] == "2026-11-24T20:00:00Z"
    )  # whole seconds: the replay is de-duplicated
    assert streams[1].query["timestamps"] == "true" and streams[1].query["container"] == "pytorch"
    assert log.has("log stream of master-0 dropped")


def test_rerun_for_the_same_results_prefix_adopts_the_running_job(stand_in):
    first = make_manifest(run_id="run-1")
    first_name = first["metadata"]["name"]
    stand_in.create_job(first)
    stand_in.admit(first_name)
    stand_in.add_pod(first_name, "master", 0, ["still working on shard 7"])
    rerun = make_manifest(run_id="run-2")  # a new run writing to the same results prefix
    assert rerun["metadata"]["name"] != first_name
    stand_in.script(
        Step(
            followed_log_of(master(first_name)),
            lambda s: (
                s.append_log(master(first_name), "shard 7 committed"),
                s.terminate_pod(master(first_name), 0),
                s.finish(first_name, "Succeeded", "PyTorchJobSucceeded", "done"),
            ),
            at="received",
        )
    )
    log = CollectedLog()

    outcome = launch(stand_in, rerun, log)

    assert outcome.adopted and outcome.name == first_name
    assert stand_in.calls("POST", JOBS) == []  # no second job
    assert stand_in.calls("DELETE") == []
    lookup = stand_in.calls("GET", JOBS)[0]
    assert lookup.query == {"labelSelector": f"{RESULTS_HASH_LABEL}={results_hash(RESULTS)}"}
    assert log.has(f"adopting existing PyTorchJob {NS}/{first_name}")
    assert log.count("[master-0] shard 7 committed") == 1


def test_rerun_waits_for_a_job_still_being_deleted_before_creating(stand_in):
    old = make_manifest(run_id="run-1")
    old_name = old["metadata"]["name"]
    stand_in.create_job(old)
    stand_in.update_job(
        old_name, lambda job: job["metadata"].update(deletionTimestamp="2026-11-24T19:59:00Z")
    )
    rerun = make_manifest(run_id="run-2")
    name = rerun["metadata"]["name"]
    stand_in.script(
        # The garbage collector finishes the old job while the launcher waits for it.
        Step(
            lambda r: r.method == "GET" and r.path == f"{JOBS}/{old_name}",
            lambda s: s.delete_job(NS, old_name),
            at="received",
        ),
        Step(
            listed_workloads,
            lambda s: (s.admit(name), s.add_pod(name, "master", 0, ["ok"], state="terminated")),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: s.finish(name, "Succeeded", "PyTorchJobSucceeded", "done"),
        ),
    )
    log = CollectedLog()

    outcome = launch(stand_in, rerun, log)

    assert outcome.name == name and not outcome.adopted
    assert log.has(f"PyTorchJob {old_name} for the same results prefix is being deleted; waiting")
    order = [
        (r.method, r.path)
        for r in stand_in.requests
        if r.path.startswith(JOBS) and r.method != "GET" or r.path == f"{JOBS}/{old_name}"
    ]
    assert order == [("GET", f"{JOBS}/{old_name}"), ("POST", JOBS)]


def test_retry_of_the_same_run_replaces_its_finished_job(stand_in):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    stand_in.create_job(manifest)
    stand_in.finish(name, "Failed", "PyTorchJobFailed", "earlier attempt failed")
    old_uid = stand_in.job(name)["metadata"]["uid"]
    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (s.admit(name), s.add_pod(name, "master", 0, ["ok"], state="terminated")),
        ),
        Step(
            followed_log_of(master(name)),
            lambda s: s.finish(name, "Succeeded", "PyTorchJobSucceeded", "done"),
        ),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    assert outcome.uid != old_uid and not outcome.adopted
    assert len(stand_in.calls("POST", JOBS)) == 2  # 409 AlreadyExists, then the replacement
    assert len(stand_in.calls("DELETE", f"{JOBS}/{name}")) == 1
    assert log.has("exists from an earlier attempt (Failed); replacing it")


@pytest.mark.parametrize("kueue_version", ["v1beta2", "v1beta1"])
def test_rejected_admission_check_deletes_the_job_and_fails_with_its_message(kueue_version):
    manifest = make_manifest()
    name = manifest["metadata"]["name"]
    rejection = "maxRunDurationSeconds of 8 days exceeds the maximum of 7 days"
    log = CollectedLog()
    with KubeApiStandIn(kueue_version=kueue_version) as stand_in:
        stand_in.script(Step(listed_workloads, lambda s: s.set_admission_check(name, "Rejected", rejection)))

        with pytest.raises(AdmissionRejected) as rejected:
            launch(stand_in, manifest, log)

        deletes = stand_in.calls("DELETE", f"{JOBS}/{name}")
        job_left = stand_in.job(name)
        workload_reads = stand_in.calls("GET", "/workloads")
    assert rejection in str(rejected.value) and "'dws-prov'" in str(rejected.value)
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Foreground"}
    assert job_left is None
    assert log.has("dws-prov: Pending") and log.has("dws-prov: Rejected")
    # The Kueue API version is discovered, so older Kueue releases (v1beta1 only) work too.
    assert {r.path for r in workload_reads} == {
        f"/apis/kueue.x-k8s.io/{kueue_version}/namespaces/{NS}/workloads"
    }


@pytest.mark.parametrize(
    "cluster, names",
    [
        (dict(pytorchjob_crd=False), "PyTorchJob CRD (pytorchjobs.kubeflow.org/v1) is not installed"),
        (dict(namespaces=()), "namespace 'batch-inference' does not exist"),
        (dict(namespaces=(), namespace_read_allowed=False), "namespace 'batch-inference' does not exist"),
        (dict(local_queues=()), "LocalQueue 'dws-local-queue' does not exist in namespace 'batch-inference'"),
        (dict(kueue_installed=False), "Kueue is not installed"),
    ],
    ids=["crd", "namespace", "namespace-found-at-create", "local-queue", "kueue"],
)
def test_missing_cluster_resource_is_a_one_line_error_naming_it(cluster, names):
    with KubeApiStandIn(**cluster) as server:
        with pytest.raises(MissingClusterResource) as missing:
            launch(server, make_manifest(), CollectedLog())
        created = [r for r in server.calls("POST", JOBS) if r.query]
        jobs_left = dict(server.jobs)

    assert names in str(missing.value)
    assert "\n" not in str(missing.value)
    assert isinstance(missing.value, LauncherError)
    assert jobs_left == {}
    if cluster.get("namespace_read_allowed") is False:
        assert len(created) == 1  # the namespace could only be found missing by the create call
    else:
        assert created == []  # found before anything was created


def test_in_cluster_credentials_reread_the_rotated_token(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("first-token\n")
    (tmp_path / "ca.crt").write_text("not used offline")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    api = in_cluster_api(sa_dir=str(tmp_path))
    first = api.request_headers()["Authorization"]
    (tmp_path / "token").write_text("rotated-token")  # the kubelet refreshes projected tokens in place

    assert api.base_url == "https://10.96.0.1:443"
    assert first == "Bearer first-token"
    assert api.request_headers()["Authorization"] == "Bearer rotated-token"


def test_in_cluster_credentials_outside_a_pod_say_so(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeError, match="not running in a Kubernetes pod"):
        in_cluster_api(sa_dir=str(tmp_path))
