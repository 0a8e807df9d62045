"""The job supervisor, for every job kind, against a local HTTP stand-in for the Kubernetes API server.

The supervisor, its HTTP client, sockets, threads and the SIGTERM path are real; only the API
server (and the controllers behind it: Kueue, DWS, the Training Operator, Trainer, JobSet) is
played by ``tests/support/k8s_stand_in.py``. Each test scripts what the cluster does in response
to what the launcher asks, then checks what the launcher did to the API (creates, deletes,
watch resumption) and what it logged. Every lifecycle test runs once per job kind.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
from datetime import datetime, timedelta, timezone

import certifi
import pytest
import requests

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
from components.launch.kubernetes.kinds import (
    JOB_KINDS,
    RESULTS_HASH_LABEL,
    JobConfig,
    job_kind,
    job_name_for,
    results_hash,
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


def test_queued_job_reports_the_dws_wait_then_streams_every_nodes_log_and_succeeds(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    stand_in.script(
        Step(
            listed_provisioning_requests,
            lambda s: (
                s.admit(name),
                s.add_pod(
                    name, 0, ["loading model", "shard 0 committed", "done: 5000 images"], state="terminated"
                ),
                s.add_pod(name, 1, ["node 1 up", "node 1 done"], state="terminated"),
            ),
        ),
        Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    assert outcome.name == name and not outcome.adopted
    assert outcome.log_tail == ["loading model", "shard 0 committed", "done: 5000 images"]
    creates = stand_in.calls("POST", stand_in.jobs_path)
    assert len(creates) == 1 and creates[0].query == {"fieldValidation": "Strict"}
    assert creates[0].body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "dws-local-queue"
    assert stand_in.calls("DELETE") == []
    # The queue report names the DWS admission check, its state and message, and the ProvisioningRequest.
    assert log.has("Suspended")
    assert log.has("admission checks: dws-prov: Pending (Waiting for resources.")
    assert log.has("QuotaReserved=True")
    assert log.has(f"provisioning request {stand_in.controller.name}-{name}-")
    assert log.has("Provisioned=False (NotProvisioned: Waiting for resources.")
    assert log.has("was admitted by Kueue")
    leader = node0(stand_in)
    for line in ("loading model", "shard 0 committed", "done: 5000 images"):
        assert log.count(f"[{leader}] {line}") == 1, log
    other = [line for line in log if line.endswith("] node 1 done")]
    assert len(other) == 1 and not other[0].startswith(f"[{leader}]")  # every node's log, each named
    running = next(i for i, line in enumerate(log) if line.startswith(f"{ref(stand_in, name)}: Running"))
    assert running < log.index(f"[{leader}] loading model")
    workload_list = stand_in.calls("GET", "/workloads")[0]
    assert workload_list.query["labelSelector"] == f"kueue.x-k8s.io/job-uid={outcome.uid}"
    streams = stand_in.calls("GET", "/log", follow="true")
    assert {r.query["container"] for r in streams} == {stand_in.controller.container}


def test_an_inactive_local_queue_is_explained_at_once_and_the_wait_is_reported_as_it_changes(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    stand_in.deactivate_cluster_queue()  # as with its ProvisioningRequest admission check inactive

    def read_local_queue(request) -> bool:
        return request.path.endswith("/localqueues/dws-local-queue")

    stand_in.script(
        *[Step(listed_workloads, lambda s: None) for _ in range(3)],  # three reports see it inactive
        Step(read_local_queue, lambda s: s.activate_cluster_queue(), at="received"),  # fixed by the fourth
        Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, 0, ["ok"], state="terminated"))),
        Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
    )
    log = CollectedLog()

    launch(stand_in, manifest, log)

    local_queue = f"LocalQueue {NS}/dws-local-queue"
    inactive = (
        f"suspended: {local_queue} is inactive (ClusterQueueIsInactive: Can't submit new workloads to "
        "clusterQueue): its ClusterQueue dws-cluster-queue admits nothing until it is active "
        "(`kubectl describe clusterqueue dws-cluster-queue` says why, e.g. an inactive admission check)"
    )
    assert log.count(inactive) == 1
    # Said at the first report, right after the job was queued: before any Workload was read.
    assert log.index(inactive) == log.at("is queued in Kueue") + 1
    lookups = [i for i, r in enumerate(stand_in.requests) if read_local_queue(r)]
    first_report = next(i for i, r in enumerate(stand_in.requests) if listed_workloads(r))
    assert lookups[1] < first_report  # [0] is the check before creating the job
    unreserved = "QuotaReserved=False (Pending: ClusterQueue dws-cluster-queue is inactive)"
    assert log.count(unreserved) == 1  # the same state is not repeated ...
    assert log.count("suspended: still waiting for quota (for ") == 2  # ... but briefly noted at each report
    assert log.count(f"suspended: {local_queue} is active again (Ready: Can submit new workloads") == 1
    assert log.count("QuotaReserved=True (QuotaReserved: Quota reserved in ClusterQueue") == 1
    assert log.at(unreserved) < log.at("is active again") < log.at("QuotaReserved=True")
    assert stand_in.steps_left() == 0


class StepClock:
    """A wall clock that moves only when a scripted step moves it: times the test can predict."""

    def __init__(self) -> None:
        self.now = datetime(2026, 10, 1, 2, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


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


def test_eviction_is_reported_and_the_readmitted_job_is_followed_again(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    wall = StepClock()
    submitted = wall.now
    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                wall.advance(minutes=10),
                s.admit(name),
                s.add_pod(name, 0, ["first attempt"], state="terminated", exit_code=143),
            ),
        ),
        Step(
            stand_in.followed_log(0),
            lambda s: (
                wall.advance(minutes=20),
                s.evict(name, "PodsReadyTimeout", "Exceeded the PodsReady timeout default/job"),
            ),
        ),
        Step(
            listed_workloads,
            lambda s: (
                wall.advance(hours=2),  # back in the queue, holding no GPUs
                s.admit(name),
                s.add_pod(name, 0, ["second attempt", "all shards done"], state="terminated"),
            ),
        ),
        Step(stand_in.followed_log(0), lambda s: (wall.advance(minutes=40), s.finish(name, succeeded=True))),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log, wall_clock=wall)

    # GPUs held: 20 minutes until the eviction, then 40 after the readmission; not the 2 hours between.
    assert outcome.admitted_at == submitted + timedelta(minutes=10)
    assert outcome.ended_at == outcome.admitted_at + timedelta(hours=3)
    assert outcome.held_seconds == 60 * 60

    assert outcome.log_tail[-2:] == ["second attempt", "all shards done"]
    assert len(stand_in.calls("POST", stand_in.jobs_path)) == 1
    assert stand_in.calls("DELETE") == []
    assert log.has("was suspended again after admission: Kueue evicted its workload")
    assert log.count(f"evicted: workload {stand_in.controller.name}-") == 1
    assert log.has("(PodsReadyTimeout: Exceeded the PodsReady timeout")
    assert log.count("was admitted by Kueue") == 2
    for line in ("first attempt", "second attempt", "all shards done"):
        assert log.count(f"[{node0(stand_in)}] {line}") == 1, log
    assert stand_in.steps_left() == 0


def test_job_without_a_queue_runs_without_kueue_and_reports_its_pods_while_starting(stand_in):
    manifest = make_manifest(stand_in.controller.name, queue=None, max_run_duration_seconds=None)
    name = manifest["metadata"]["name"]

    def start_pods(s: KubeApiStandIn) -> None:
        s.add_pod(name, 0, state="waiting")
        s.add_pod(name, 1, state="waiting")

    def running(s: KubeApiStandIn) -> None:
        s.terminate_pod(s.pod_name(name, 1), 0)
        s.delete_pod(s.pod_name(name, 0))
        s.add_pod(name, 0, ["no queue, still fine"], state="terminated")
        s.start(name)

    stand_in.script(
        Step(lambda r: r.method == "POST", start_pods, at="received"),  # pods exist once the create returns
        Step(listed_all_pods, running),
        Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    assert outcome.log_tail == ["no queue, still fine"]
    assert (
        stand_in.calls("GET", "/workloads") == []
        and stand_in.calls("GET", "/localqueues/dws-local-queue") == []
    )
    assert log.has("starting: pods ") and log.has(" Pending (ContainerCreating)")
    assert not log.has("Suspended")


# How the launcher counts a restart: JobSet's and Trainer's gangs restart whole (a TrainJob's limit
# is in its runtime, which the launcher may not read); a PyTorchJob restarts the failed pod alone.
RESTART = {"pytorchjob": "restart 1 of 3", "trainjob": "gang restart 1", "jobset": "gang restart 1 of 3"}


def test_a_restart_is_reported_once_naming_the_failed_rank_and_the_new_pods_are_followed(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    failed = []

    def node1_fails(s: KubeApiStandIn) -> None:
        failed.append(s.pod_name(name, 1))
        s.restart(name, failed_node=1, exit_code=1)
        if s.controller.restarts_gang:
            s.add_pod(name, 0, ["attempt 1 of node 0"])
            s.add_pod(name, 1, ["attempt 1 of node 1"])
        else:
            s.append_log(s.pod_name(name, 1), "attempt 1 of node 1")
        s.start(name)

    def finish(s: KubeApiStandIn) -> None:
        for node in (0, 1):
            s.terminate_pod(s.pod_name(name, node), 0)
        s.finish(name, succeeded=True)

    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(name, 0, ["attempt 0 of node 0"]),
                s.add_pod(name, 1, ["attempt 0 of node 1"]),
            ),
        ),
        Step(stand_in.followed_log(1), node1_fails, at="received"),
        Step(listed_all_pods, finish),  # once the launcher has looked at the pods after the restart
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    node1 = NODE_1[stand_in.controller.name]
    restarts = [line for line in log if " restart " in line]
    assert restarts == [
        f"{ref(stand_in, name)}: {RESTART[stand_in.controller.name]}: "
        f"{node1} (pod {failed[0]} on gke-a3-ultra-1) failed: exit code 1"
    ]
    assert log.count(f"[{node1}] attempt 1 of node 1") == 1  # the restarted node is followed on
    if stand_in.controller.restarts_gang:
        assert log.count(f"[{node0(stand_in)}] attempt 1 of node 0") == 1
    assert outcome.name == name and stand_in.calls("DELETE") == []
    assert stand_in.steps_left() == 0


NCCL_FAILURE = [
    "[default0]:Traceback (most recent call last):",
    '[default0]:  File "worker/run.py", line 12, in run',
    "[default0]:    batch = next(reader)",
    "[default0]:RuntimeError: NCCL error: unhandled system error",
]
ECHO = [
    "[default0]:[rank0]: Traceback (most recent call last):",
    '[default0]:[rank0]:   File "worker/dist.py", line 50, in broadcast',
    "[default0]:[rank0]:     dist.broadcast_object_list(box, src=0, group=self.control_group)",
    "[default0]:[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.7]:8841",
]


def test_failed_job_ends_with_the_first_failing_ranks_error_not_its_peers_echo(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    reason = []

    def fail(s: KubeApiStandIn) -> None:
        # Node 0 fails last and loudest: its peers' death reached it as a lost gloo connection.
        s.append_log(s.pod_name(name, 0), *ECHO)
        s.terminate_pod(s.pod_name(name, 0), 1, finished_at="2026-11-24T20:00:09Z")
        reason.append(s.finish(name, succeeded=False))

    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(
                    name, 0, ["[default0]:rank 0: reading plan", "[default0]:rank 0: waiting for peers"]
                ),
                # Node 1 failed first: its log, not node 0's, holds the cause.
                s.add_pod(
                    name, 1, NCCL_FAILURE, state="terminated", exit_code=1, finished_at="2026-11-24T20:00:05Z"
                ),
            ),
        ),
        Step(stand_in.followed_log(0), fail, at="received"),
    )
    log = CollectedLog()

    with pytest.raises(JobFailed) as failure:
        launch(stand_in, manifest, log)

    message = str(failure.value)
    ((condition_reason, condition_message),) = reason
    assert condition_reason in message and condition_message in message
    assert failure.value.reason == condition_reason
    node1 = stand_in.pod_name(name, 1)
    assert f"pod {node1}" in message and failure.value.pod == f"pod {node1}"
    # The message ends with the cause (its traceback is in the tail above), the echo named as one before it.
    verdict = (
        f"{NODE_1[stand_in.controller.name]} (pod {node1} on gke-a3-ultra-1, process 0) failed first "
        "(exit code 1): RuntimeError: NCCL error: unhandled system error"
    )
    assert message.splitlines()[-1] == verdict
    echo_line = next(line for line in message.splitlines() if "failed too" in line)
    assert echo_line.startswith(node0(stand_in)) and "Connection closed by peer" in echo_line
    assert message.index(echo_line) < message.rindex("failed first")
    first_line = message.splitlines()[0]  # what a UI showing one line shows
    assert condition_reason in first_line and first_line.endswith(verdict)
    assert failure.value.log_tail[-1] == "[default0]:RuntimeError: NCCL error: unhandled system error"
    tail_reads = stand_in.calls("GET", f"/pods/{node1}/log")
    assert [r for r in tail_reads if r.query.get("tailLines") == "2000"]
    assert log.count(f"[{node0(stand_in)}] [default0]:rank 0: waiting for peers") == 1
    # A failed job is finished, not left running: it is kept for inspection, not deleted.
    assert stand_in.calls("DELETE") == []


@pytest.mark.parametrize("ending", ["oom-killed", "evicted"])
def test_failed_rank_is_named_from_its_pods_status_when_its_log_cannot_be_read(stand_in, ending):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    eviction = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 52Mi."
    reason = []

    def node1_dies(s: KubeApiStandIn) -> None:
        pod = s.pod_name(name, 1)
        s.lose_logs(pod)  # its node is gone: the API server cannot reach the kubelet for its log
        if ending == "evicted":
            s.evict_pod(pod, eviction)
        else:
            s.terminate_pod(pod, 137, reason="OOMKilled", finished_at="2026-11-24T20:00:05Z")
        s.append_log(s.pod_name(name, 0), *ECHO)
        s.terminate_pod(s.pod_name(name, 0), 1, finished_at="2026-11-24T20:00:09Z")
        reason.append(s.finish(name, succeeded=False))

    stand_in.script(
        Step(
            listed_workloads,
            lambda s: (
                s.admit(name),
                s.add_pod(name, 0, ["[default0]:rank 0: waiting for peers"]),
                s.add_pod(name, 1),
            ),
        ),
        Step(stand_in.followed_log(0), node1_dies, at="received"),
    )

    with pytest.raises(JobFailed) as failure:
        launch(stand_in, manifest, CollectedLog())

    ((condition_reason, condition_message),) = reason
    pod = stand_in.pod_name(name, 1)
    status = f"exit code 137; Evicted: {eviction}" if ending == "evicted" else "exit code 137 (OOMKilled)"
    verdict = f"{NODE_1[stand_in.controller.name]} (pod {pod} on gke-a3-ultra-1) failed first: {status}"
    lines = str(failure.value).splitlines()
    assert lines[0] == f"{ref(stand_in, name)} failed ({condition_reason}: {condition_message}): {verdict}"
    assert lines[-1] == verdict and f"(no log lines could be read from pod {pod})" in lines
    # Node 0's lost connection, which it logged last, is named as what it is: an echo.
    assert any(line.startswith(f"{node0(stand_in)} failed too: RuntimeError: [gloo") for line in lines)
    assert failure.value.pod == f"pod {pod}" and failure.value.log_tail == []


@pytest.mark.parametrize("kind", ["trainjob", "jobset"])
def test_after_a_gang_restart_the_failure_is_told_from_the_last_gang(kind):
    manifest = make_manifest(kind)
    name = manifest["metadata"]["name"]
    earlier_cause = [
        line.replace("RuntimeError: NCCL error: unhandled system error", "ValueError: bad shard")
        for line in NCCL_FAILURE
    ]
    new_pod = []

    def restart_then_fail(s: KubeApiStandIn) -> None:
        s.restart(name, failed_node=1, exit_code=1)  # the first gang's pods stay listed, terminating
        new_pod.append(s.add_pod(name, 0, NCCL_FAILURE, state="terminated", exit_code=1))
        s.add_pod(name, 1, ["[default0]:rank 8: waiting for peers"], state="terminated", exit_code=143)
        s.finish(name, succeeded=False)

    with KubeApiStandIn(kind=kind) as stand_in:
        stand_in.script(
            Step(
                listed_workloads,
                lambda s: (
                    s.admit(name),
                    s.add_pod(name, 0, ["starting"]),
                    s.add_pod(name, 1, earlier_cause),
                ),
            ),
            Step(stand_in.followed_log(1), restart_then_fail, at="received"),
        )
        with pytest.raises(JobFailed) as failure:
            launch(stand_in, manifest, CollectedLog())

    lines = str(failure.value).splitlines()
    assert lines[-1] == (
        f"node-0 (pod {new_pod[0]} on gke-a3-ultra-0, process 0) failed first (exit code 1): "
        "RuntimeError: NCCL error: unhandled system error"
    )
    assert not any("bad shard" in line for line in lines)  # restarted past, reported then


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


def test_timeout_while_queued_deletes_the_job_with_background_propagation(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    log = CollectedLog()
    # A clock that advances 10 s per reading: the 60 s timeout passes after a few loops, deterministically.
    ticks = itertools.count(0, 10)

    with pytest.raises(JobTimedOut) as timeout:
        launch(stand_in, manifest, log, timeout_s=60, poll_interval_s=0.01, clock=lambda: float(next(ticks)))

    assert "did not finish within 60s" in str(timeout.value) and "Suspended" in str(timeout.value)
    deletes = stand_in.calls("DELETE", f"{stand_in.jobs_path}/{name}")
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Background"}
    assert stand_in.job(name) is None
    # Reported once, then briefly at every report while it does not change.
    assert log.count(f"suspended: workload {stand_in.controller.name}-") == 1
    assert log.count("suspended: provisioning request ") == 1
    still = [line for line in log if line.startswith("suspended: still waiting for admission check dws-prov")]
    waited = [int(re.search(r"\(for (\d+)s\)$", line)[1]) for line in still]
    assert (
        len(waited) >= 2 and waited == sorted(set(waited)) and waited[0] > 0
    )  # counted from the first report
    assert log.has(
        f"deleted {ref(stand_in, name)} (timed out after 60s); {ref(stand_in, name)} is gone; no pod"
    )


def test_sigterm_while_running_deletes_the_job_and_exits(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    received = []

    def outer_handler(signum, frame):  # what the component had installed before the launcher ran
        received.append(signum)

    stand_in.script(
        Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, 0, ["step 1"]))),
        # The pipeline is cancelled once the job runs: SIGTERM to this very process.
        Step(stand_in.followed_log(0), lambda s: os.kill(os.getpid(), signal.SIGTERM), at="received"),
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
    deletes = stand_in.calls("DELETE", f"{stand_in.jobs_path}/{name}")
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Background"}
    assert stand_in.job(name) is None
    assert log.has("cancelled by SIGTERM") and log.has(
        f"deleted {ref(stand_in, name)} (pipeline run cancelled); its pods are deleted in the background"
    )


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


def test_rerun_for_the_same_results_prefix_adopts_the_running_job(stand_in):
    first = make_manifest(stand_in.controller.name, run_id="run-1")
    first_name = first["metadata"]["name"]
    stand_in.create_job(first)
    stand_in.admit(first_name)
    pod = stand_in.add_pod(first_name, 0, ["still working on shard 7"])
    rerun = make_manifest(stand_in.controller.name, run_id="run-2")  # a new run writing to the same prefix
    assert rerun["metadata"]["name"] != first_name
    stand_in.script(
        Step(
            stand_in.followed_log(0),
            lambda s: (
                s.append_log(pod, "shard 7 committed"),
                s.terminate_pod(pod, 0),
                s.finish(first_name, succeeded=True),
            ),
            at="received",
        )
    )
    log = CollectedLog()

    wall = StepClock()
    admitted = next(
        c["lastTransitionTime"]
        for c in stand_in.workload_of(first_name)["status"]["conditions"]
        if c["type"] == "Admitted"
    )
    wall.now = datetime.fromisoformat(admitted.replace("Z", "+00:00")) + timedelta(minutes=50)

    outcome = launch(stand_in, rerun, log, wall_clock=wall)

    assert outcome.adopted and outcome.name == first_name
    # Admitted before this launcher looked: the GPUs were held from the Workload's admission.
    assert outcome.admitted_at == wall.now - timedelta(minutes=50) and outcome.held_seconds == 50 * 60
    assert stand_in.calls("POST", stand_in.jobs_path) == []  # no second job
    assert stand_in.calls("DELETE") == []
    lookup = stand_in.calls("GET", stand_in.jobs_path)[0]
    assert lookup.query == {"labelSelector": f"{RESULTS_HASH_LABEL}={results_hash(RESULTS)}"}
    assert log.has(f"adopting existing {ref(stand_in, first_name)}")
    assert log.count(f"[{node0(stand_in)}] shard 7 committed") == 1


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


def test_retry_of_the_same_run_replaces_its_finished_job(stand_in):
    manifest = make_manifest(stand_in.controller.name)
    name = manifest["metadata"]["name"]
    stand_in.create_job(manifest)
    stand_in.admit(name)
    stand_in.add_pod(name, 0, ["out of memory"], state="terminated", exit_code=137)
    stand_in.finish(name, succeeded=False)
    old_uid = stand_in.job(name)["metadata"]["uid"]
    stand_in.hold_dependents()
    stand_in.script(
        Step(lambda r: r.method == "DELETE", lambda s: None),
        Step(listed_all_pods, lambda s: s.collect_garbage(name)),
        Step(listed_workloads, lambda s: (s.admit(name), s.add_pod(name, 0, ["ok"], state="terminated"))),
        Step(stand_in.followed_log(0), lambda s: s.finish(name, succeeded=True)),
    )
    log = CollectedLog()

    outcome = launch(stand_in, manifest, log)

    assert outcome.uid != old_uid and not outcome.adopted
    creates = stand_in.calls("POST", stand_in.jobs_path)
    assert len(creates) == 2  # 409 AlreadyExists, then the replacement
    deletes = stand_in.calls("DELETE", f"{stand_in.jobs_path}/{name}")
    assert len(deletes) == 1 and deletes[0].query == {"propagationPolicy": "Background"}
    # Created only once the old job's pod was terminating: the first look after the delete found it not yet.
    between = stand_in.requests[position(stand_in, deletes[0]) : position(stand_in, creates[1])]
    assert len([r for r in between if listed_all_pods(r)]) == 2
    assert log.has("exists from an earlier attempt (Failed); replacing it")
    assert log.has(f"{ref(stand_in, name)} is gone; its pods: 1 terminating")
    assert outcome.log_tail == ["ok"]


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
def test_a_kind_kueue_does_not_manage_is_named_while_it_waits(kind):
    # Kueue 0.19 turned its PyTorchJob integration off: the job stays suspended with no Workload.
    ticks = itertools.count(0, 10)
    log = CollectedLog()
    with KubeApiStandIn(kind=kind, kueue_manages=False) as stand_in:
        with pytest.raises(JobTimedOut):
            launch(
                stand_in,
                make_manifest(kind),
                log,
                timeout_s=100,
                poll_interval_s=0.01,
                clock=lambda: float(next(ticks)),
            )
    framework = job_kind(kind).kueue_framework
    hint = [line for line in log if "Kueue has made no Workload" in line]
    assert len(hint) == 1 and f"is its {framework!r} integration enabled" in hint[0]


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
