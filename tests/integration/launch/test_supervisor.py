"""The job supervisor, for every job kind, against a local HTTP stand-in for the Kubernetes API server.

Only what a real API server cannot be made to do on demand stays here: dropped and expired
watches, cut log streams, a garbage collector that lags, pods gone before their logs are read,
an older Kueue's API and a TLS bundle in the environment, to the minute timing of GPU-hours. Every
verdict the real controllers give (admission, DWS waits and rejections, eviction, restarts,
failures, timeouts, cancellation, adoption) is tested against them in ``tests/cluster/``.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import certifi
import pytest
import requests

from components.launch.kubernetes.api import KubernetesApi
from components.launch.kubernetes.credentials import in_cluster_api
from components.launch.kubernetes.errors import (
    AdmissionRejected,
    JobFailed,
    JobTimedOut,
    LauncherError,
    MissingClusterResource,
)
from components.launch.kubernetes.kinds import (
    JOB_KINDS,
    JobConfig,
    job_kind,
    job_name_for,
)
from components.launch.kubernetes.supervisor import run_job
from tests.support.k8s_stand_in import NAMESPACE as NS
from tests.support.k8s_stand_in import (
    KubeApiStandIn,
    Step,
    listed_all_pods,
    listed_provisioning_requests,
    listed_workloads,
)
from tests.support.tls import loopback_tls
from worker.config import WorkerConfig

RESULTS = "gs://results-bucket/runs/coco-val2017"

pytestmark = pytest.mark.timeout(60)


class CollectedLog(list):
    """The launcher's ``log`` callable, keeping every line for assertions."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def count(self, needle: str) -> int:  # type: ignore[override]
        return sum(needle in line for line in self)

    def has(self, needle: str) -> bool:
        return self.count(needle) > 0

    def at(self, needle: str) -> int:
        """Where the first line holding ``needle`` is."""
        return next(i for i, line in enumerate(self) if needle in line)


def make_manifest(kind: str, run_id: str = "run-1", results: str = RESULTS, **overrides) -> dict:
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
    return job_kind(kind).build(cfg)


@pytest.fixture(params=JOB_KINDS)
def stand_in(request):
    with KubeApiStandIn(kind=request.param) as server:
        yield server
    assert not server.step_errors, server.step_errors


def launch(stand_in: KubeApiStandIn, manifest: dict, log: CollectedLog, verify: bool | str = True, **kwargs):
    api = KubernetesApi(
        stand_in.url, token="test-token", verify=verify, request_timeout_s=10, stream_read_timeout_s=20
    )
    # Short intervals keep the test fast; the 30 s timeout is only a safety net against a hang.
    options = dict(timeout_s=30, poll_interval_s=0.05, retry_interval_s=0.02, log_drain_timeout_s=10)
    options.update(kwargs)
    return run_job(api, job_kind(stand_in.controller.name), manifest, log=log, **options)


def ref(stand_in: KubeApiStandIn, name: str) -> str:
    return f"{stand_in.controller.kind} {NS}/{name}"


def position(stand_in: KubeApiStandIn, request) -> int:
    """Where ``request`` is among those received (requests can be equal, so by identity)."""
    return next(i for i, r in enumerate(stand_in.requests) if r is request)


# How the launcher names node 1: the first Worker of a PyTorchJob, pod 1 of a JobSet.
NODE_1 = {"pytorchjob": "worker-0", "trainjob": "node-1", "jobset": "node-1"}


def node0(stand_in: KubeApiStandIn) -> str:
    """How the launcher names node 0 in its log: the master, or pod 0 of the JobSet."""
    return job_kind(stand_in.controller.name).leader_rank


class StepClock:
    """A wall clock that moves only when a scripted step moves it: times the test can predict."""

    def __init__(self) -> None:
        self.now = datetime(2026, 10, 1, 2, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


ECHO = [
    "[default0]:[rank0]: Traceback (most recent call last):",
    '[default0]:[rank0]:   File "worker/dist.py", line 50, in broadcast',
    "[default0]:[rank0]:     dist.broadcast_object_list(box, src=0, group=self.control_group)",
    "[default0]:[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.7]:8841",
]


def test_the_job_is_timed_from_its_admission_not_from_its_wait_for_capacity(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    wall = StepClock()
    submitted = wall.now
    stand_in.script(
        # Three hours queued for DWS capacity, then DWS provisions the nodes and Kueue admits the job.
        Step(listed_provisioning_requests, lambda s: (wall.advance(hours=3), s.admit(name))),
        Step(
            listed_all_pods,
            lambda s: (wall.advance(minutes=5), s.add_pod(name, 0, ["done"], state="terminated")),
        ),
        Step(stand_in.followed_log(0), lambda s: (wall.advance(minutes=25), s.finish(name, succeeded=True))),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log, wall_clock=wall)

    assert outcome.admitted_at == submitted + timedelta(hours=3)  # the queue wait is not counted
    # Its start-up (the 5 minutes until the pods ran) is: the nodes were billed from admission.
    assert outcome.ended_at == outcome.admitted_at + timedelta(minutes=30)
    assert stand_in.steps_left() == 0


def test_failed_job_falls_back_to_the_streamed_logs_when_pods_are_gone(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]

    def gone(s: KubeApiStandIn) -> None:
        for node in (0, 1):
            s.delete_pod(s.pod_name(name, node))

    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(name, 0, ECHO),
                s.add_pod(
                    name, 1, ["[default0]:2026-11-24 20:00:01,000 [rank 8] ERROR worker: bad model config"]
                ),
            ),
        ),
        Step(
            stand_in.followed_log(1),
            lambda s: (
                s.terminate_pod(s.pod_name(name, 0), 1),
                s.terminate_pod(s.pod_name(name, 1), 1),
                s.finish(name, succeeded=False),
            ),
            at="received",
        ),
        # The controller has removed the pods by the time the launcher looks for the failing one.
        Step(listed_all_pods, gone, at="received"),
    )
    with pytest.raises(JobFailed) as failure:
        launch(stand_in, manifest, CollectedLog())

    last = str(failure.value).splitlines()[-1]
    assert last.endswith(
        "(as streamed), process 0) failed first: 2026-11-24 20:00:01,000 [rank 8] ERROR worker: bad model config"
    )
    assert stand_in.steps_left() == 0


@pytest.mark.parametrize("collected", [True, False], ids=["collector-catches-up", "collector-lags"])
def test_timeout_while_running_waits_until_no_pod_is_left_running_and_says_what_is_left(stand_in, collected):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    stand_in.hold_dependents()  # the job object goes at once; its pods only once the collector reaches them
    steps = [
        Step(
            listed_workloads,
            lambda s: (s.admit(name), s.add_pod(name, 0, ["step 1"]), s.add_pod(name, 1, ["step 1"])),
        )
    ]
    if collected:
        steps += [
            Step(lambda r: r.method == "DELETE", lambda s: None),
            Step(listed_all_pods, lambda s: s.collect_garbage(name)),  # after its first look
        ]
    stand_in.script(*steps)
    log = CollectedLog()
    ticks = itertools.count(0, 10)

    with pytest.raises(JobTimedOut):
        launch(
            stand_in,
            manifest,
            log,
            timeout_s=60,
            deletion_wait_s=100,
            poll_interval_s=0.01,
            clock=lambda: float(next(ticks)),
        )

    deletes = stand_in.calls("DELETE", f"{stand_in.jobs_path}/{name}")
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Background"}
    after_delete = stand_in.requests[position(stand_in, deletes[0]) :]
    assert len([r for r in after_delete if listed_all_pods(r)]) >= 2  # it looked again: the pods still ran
    pods = sorted(stand_in.pod_name(name, node) for node in (0, 1))
    deleted = next(line for line in log if line.startswith(f"deleted {ref(stand_in, name)} (timed out"))
    if collected:
        assert deleted.endswith(f"{ref(stand_in, name)} is gone; its pods: 2 terminating")
    else:
        assert deleted.endswith(
            f"after 100s, {ref(stand_in, name)} is gone; its pods: 2 not terminating yet ({', '.join(pods)})"
        )
    assert stand_in.steps_left() == 0


def test_dropped_watch_resumes_from_the_last_resource_version(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    stand_in.fail_next_watch(drop_after_events=1)  # the admission event arrives, then the connection dies
    stand_in.script(
        Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, 0, ["ok"], state="terminated"))),
        Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
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
    assert len(stand_in.calls("POST", stand_in.jobs_path)) == 1


def test_watch_410_gone_relists_then_rewatches_from_the_list(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    stand_in.fail_next_watch(gone=True)
    stand_in.script(
        Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, 0, ["ok"], state="terminated"))),
        Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
    )
    log = CollectedLog()

    launch(stand_in, manifest, log)

    job_requests = [
        r
        for r in stand_in.requests
        if r.path == stand_in.jobs_path and r.method == "GET" and r.query.get("fieldSelector")
    ]
    first_watch, relist, second_watch = job_requests[:3]
    assert first_watch.query["watch"] == "true"
    assert "watch" not in relist.query and relist.query["fieldSelector"] == f"metadata.name={name}"
    assert second_watch.query["watch"] == "true"
    assert int(second_watch.query["resourceVersion"]) >= int(first_watch.query["resourceVersion"])
    assert log.has("expired (410 Gone); relisting")


def test_dropped_log_stream_reconnects_without_duplicating_or_losing_lines(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    shared_stamp = "2026-11-24T20:00:00.500000000Z"

    def admit_with_log(s: KubeApiStandIn) -> None:
        s.admit(name)
        pod = s.add_pod(
            name,
            0,
            [
                "line 1",
                ("2026-11-24T20:00:00.400000000Z", "line 2"),
                (shared_stamp, "line 3a"),
                (shared_stamp, "line 3b"),
                ("2026-11-24T20:00:00.600000000Z", "line 4"),
            ],
        )
        s.drop_next_log_stream(pod, after_lines=3)  # cut between the two lines sharing a stamp

    def finish(s: KubeApiStandIn) -> None:
        pod = s.pod_name(name, 0)
        s.append_log(pod, ("2026-11-24T20:00:01.000000000Z", "line 5"))
        s.terminate_pod(pod, 0)
        s.finish(name, succeeded=True)

    stand_in.script(
        Step(listed_workloads, admit_with_log),
        Step(stand_in.followed_log(0, since=True), finish, at="received"),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    expected = ["line 1", "line 2", "line 3a", "line 3b", "line 4", "line 5"]
    prefix = f"[{node0(stand_in)}] "
    assert [line[len(prefix) :] for line in log if line.startswith(prefix)] == expected
    assert outcome.log_tail == expected
    streams = stand_in.calls("GET", f"/pods/{stand_in.pod_name(name, 0)}/log", follow="true")
    assert "sinceTime" not in streams[0].query
    assert (
        streams[1].query["sinceTime"] == "2026-11-24T20:00:00Z"
    )  # whole seconds: the replay is de-duplicated
    assert (
        streams[1].query["timestamps"] == "true"
        and streams[1].query["container"] == stand_in.controller.container
    )
    assert log.has(f"log stream of {node0(stand_in)} dropped")


def test_rerun_waits_for_a_job_still_being_deleted_before_creating(stand_in):
    old = make_manifest(stand_in.controller.name, run_id="run-1")
    old_name = old["metadata"]["name"]
    stand_in.create_job(old)
    stand_in.update_job(
        old_name, lambda job: job["metadata"].update(deletionTimestamp="2026-11-24T19:59:00Z")
    )
    rerun = make_manifest(stand_in.controller.name, run_id="run-2")
    name = rerun["metadata"]["name"]
    jobs = stand_in.jobs_path
    stand_in.script(
        # The garbage collector finishes the old job while the launcher waits for it.
        Step(
            lambda r: r.method == "GET" and r.path == f"{jobs}/{old_name}",
            lambda s: s.delete_job(NS, old_name),
            at="received",
        ),
        Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, 0, ["ok"], state="terminated"))),
        Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
    )
    log = CollectedLog()

    outcome = launch(stand_in, rerun, log)

    assert outcome.name == name and not outcome.adopted
    assert log.has(
        f"{stand_in.controller.kind} {old_name} for the same results prefix is being deleted; waiting"
    )
    order = [
        (r.method, r.path)
        for r in stand_in.requests
        if r.path.startswith(jobs) and r.method != "GET" or r.path == f"{jobs}/{old_name}"
    ]
    assert order == [("GET", f"{jobs}/{old_name}"), ("POST", jobs)]


@pytest.mark.parametrize("kind", JOB_KINDS)
@pytest.mark.parametrize("kueue_version", ["v1beta2", "v1beta1"])
def test_rejected_admission_check_deletes_the_job_and_fails_with_its_message(kind, kueue_version):
    manifest = make_manifest(kind)
    name = manifest["metadata"]["name"]
    rejection = "maxRunDurationSeconds of 8 days exceeds the maximum of 7 days"
    log = CollectedLog()
    with KubeApiStandIn(kind=kind, kueue_version=kueue_version) as stand_in:
        stand_in.script(Step(listed_workloads, lambda s: s.set_admission_check(name, "Rejected", rejection)))

        with pytest.raises(AdmissionRejected) as rejected:
            launch(stand_in, manifest, log)

        deletes = stand_in.calls("DELETE", f"{stand_in.jobs_path}/{name}")
        job_left = stand_in.job(name)
        workload_reads = stand_in.calls("GET", "/workloads")
    assert rejection in str(rejected.value) and "'dws-prov'" in str(rejected.value)
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Background"}
    assert job_left is None
    assert log.has("dws-prov: Pending") and log.has("dws-prov: Rejected")
    # The Kueue API version is discovered, so older Kueue releases (v1beta1 only) work too.
    assert {r.path for r in workload_reads} == {
        f"/apis/kueue.x-k8s.io/{kueue_version}/namespaces/{NS}/workloads"
    }


@pytest.mark.parametrize("kind", JOB_KINDS)
@pytest.mark.parametrize(
    "cluster, names",
    [
        (dict(crd_installed=False), "CRD ({resource}) is not installed in the cluster: install"),
        (dict(namespaces=()), "namespace 'batch-inference' does not exist"),
        (dict(namespaces=(), namespace_read_allowed=False), "namespace 'batch-inference' does not exist"),
        (dict(local_queues=()), "LocalQueue 'dws-local-queue' does not exist in namespace 'batch-inference'"),
        (dict(kueue_installed=False), "Kueue is not installed"),
    ],
    ids=["crd", "namespace", "namespace-found-at-create", "local-queue", "kueue"],
)
def test_missing_cluster_resource_is_a_one_line_error_naming_it(kind, cluster, names):
    with KubeApiStandIn(kind=kind, **cluster) as server:
        with pytest.raises(MissingClusterResource) as missing:
            launch(server, make_manifest(kind), CollectedLog())
        created = [r for r in server.calls("POST", server.jobs_path) if r.query]
        jobs_left = dict(server.jobs)

    assert names.format(resource=job_kind(kind).resource) in str(missing.value)
    assert "\n" not in str(missing.value)
    assert isinstance(missing.value, LauncherError)
    assert jobs_left == {}
    if cluster.get("namespace_read_allowed") is False:
        assert len(created) == 1  # the namespace could only be found missing by the create call
    else:
        assert created == []  # found before anything was created


def test_the_clusters_ca_verifies_tls_whatever_ca_bundle_the_environment_names(tmp_path, monkeypatch):
    ca, tls = loopback_tls(tmp_path)
    # Valid bundles without the cluster's CA: requests lets these replace a session's CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("CURL_CA_BUNDLE", certifi.where())
    manifest = make_manifest("jobset")
    name = manifest["metadata"]["name"]
    log = CollectedLog()
    with KubeApiStandIn(kind="jobset", tls=tls) as stand_in:
        stand_in.script(
            Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, 0, ["ok"], state="terminated"))),
            Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
        )
        with pytest.raises(requests.exceptions.SSLError):  # the environment's bundle alone cannot verify it
            KubernetesApi(stand_in.url, verify=True).kueue_api_version()

        outcome = launch(stand_in, manifest, log, verify=ca)

        streams = stand_in.calls("GET", "/log", follow="true")
    assert stand_in.url.startswith("https://")
    assert outcome.log_tail == ["ok"] and streams  # plain calls, the watch and the log streams alike


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
