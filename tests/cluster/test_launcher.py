"""The launcher against the real controllers, for every job kind, as the overlay's own service account.

Kueue makes the Workload and asks DWS (a ProvisioningRequest) for the nodes; the test, playing
GKE's autoscaler, holds the request, then provisions it; Kueue admits the job, its controller
makes the pods, the scheduler puts them on kwok's A3 Ultra nodes, and kwok serves their logs.
The verdicts (admitted, running, restarted, failed, succeeded, evicted) are the controllers' own.
"""

from __future__ import annotations

import pytest

from components.launch.kubernetes.errors import AdmissionRejected, JobFailed, JobTimedOut, LauncherError
from components.launch.kubernetes.kinds import JOB_KINDS, RESULTS_HASH_LABEL, job_kind, results_hash
from tests.support.control_plane import KUEUE_FRAMEWORKS
from tests.support.gke_player import (
    KUEUE,
    RESTART_ATTEMPT_LABEL,
    Launcher,
    LauncherProcess,
    SteppedClock,
    cluster_job_config,
)

pytestmark = pytest.mark.cluster


def node_lines(rank: int, *lines: str) -> list[str]:
    return [f"[default{rank * 8}]:{line}" for line in lines]


@pytest.mark.parametrize("kind_name", JOB_KINDS)
def test_queued_job_waits_for_dws_then_runs_on_the_gpu_nodes_and_succeeds(
    gke, launcher_api, run_id, kind_name
):
    kind = job_kind(kind_name)
    cfg = cluster_job_config(run_id)
    launcher = Launcher(launcher_api, kind, kind.build(cfg)).start()
    uid = launcher.job_uid(gke, cfg.name)

    request = gke.pending_provisioning_request(uid)
    # While DWS has not answered, the launcher says what it waits for.
    launcher.wait_for_line(lambda line: "dws-prov" in line and "Pending" in line)
    launcher.wait_for_line(f"provisioning request {request['metadata']['name']}")
    assert not gke.pods(kind.pod_selector(cfg.name)), "no pod may exist before admission"

    gke.provision(uid)
    launcher.wait_for_line("admitted by Kueue")
    pods = gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    assert all(p["spec"]["nodeName"].startswith("a3u-") for p in pods)
    assert len({p["spec"]["nodeName"] for p in pods}) == cfg.nodes, "one pod per node"
    if kind_name == "jobset":  # torchrun's rendezvous host is node 0's name on JobSet's headless service
        (leader,) = [p for p in pods if kind.rank(p) == kind.leader_rank]
        env = {e["name"]: e.get("value") for e in leader["spec"]["containers"][0]["env"]}
        assert env["PET_MASTER_ADDR"] == f"{leader['spec']['hostname']}.{leader['spec']['subdomain']}"
    for rank, pod in enumerate(sorted(pods, key=kind.rank)):
        gke.write_log(pod, kind.container, node_lines(rank, f"worker on node {rank} classified 100 images"))
    for rank in range(cfg.nodes):
        launcher.wait_for_line(f"worker on node {rank} classified 100 images")
    for pod in pods:
        gke.end(pod, 0)

    outcome = launcher.result()
    assert outcome.name == cfg.name and not outcome.adopted
    assert outcome.admitted_at is not None and outcome.ended_at >= outcome.admitted_at
    assert 0 < outcome.held_seconds < 600
    assert any("classified 100 images" in line for line in outcome.log_tail)


# Gang restarts each kind makes before the job fails: PyTorchJob none (backoff_limit 0), JobSet one
# (backoff_limit 1 is its failurePolicy.maxRestarts), TrainJob three (cluster/'s TrainingRuntime).
RESTARTS = {"pytorchjob": 0, "jobset": 1, "trainjob": 3}


@pytest.mark.parametrize("kind_name", JOB_KINDS)
def test_a_failed_rank_restarts_the_gang_then_fails_the_job_with_that_ranks_error(
    gke, launcher_api, run_id, kind_name
):
    kind = job_kind(kind_name)
    cfg = cluster_job_config(run_id, backoff_limit=RESTARTS[kind_name])
    launcher = Launcher(launcher_api, kind, kind.build(cfg)).start()
    gke.provision(launcher.job_uid(gke, cfg.name))
    for attempt in range(RESTARTS[kind_name] + 1):
        pods = sorted(
            gke.running_pods(
                kind.pod_selector(cfg.name),
                cfg.nodes,
                where=lambda p, attempt=attempt: (
                    p["metadata"]["labels"].get(RESTART_ATTEMPT_LABEL, "0") == str(attempt)
                ),
            ),
            key=kind.rank,
        )
        if attempt:
            launcher.wait_for_line(f"gang restart {attempt}")
        gke.write_log(pods[0], kind.container, node_lines(0, "RuntimeError: Connection closed by peer"))
        gke.write_log(
            pods[1],
            kind.container,
            [
                "[default8]:Traceback (most recent call last):",
                '[default8]:  File "/app/worker/infer.py", line 88, in run',
                f"[default8]:torch.OutOfMemoryError: CUDA out of memory (attempt {attempt})",
            ],
        )
        launcher.wait_for_line(f"CUDA out of memory (attempt {attempt})")
        gke.end(pods[1], 1)

    error = launcher.error()
    assert isinstance(error, JobFailed), error
    first_line = str(error).splitlines()[0]
    assert kind.rank(pods[1]) in first_line, first_line
    assert f"CUDA out of memory (attempt {RESTARTS[kind_name]})" in first_line, first_line
    # The controller stops the other rank's pod: nothing keeps holding GPUs.
    gke.kube.wait_for(
        "no running pod left",
        lambda: (
            not [
                p
                for p in gke.pods(kind.pod_selector(cfg.name))
                if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
            ]
        ),
    )


def test_timeout_while_running_deletes_the_job_and_its_pods(gke, launcher_api, run_id):
    kind = job_kind("trainjob")  # the kind whose foreground delete kept re-creating pods
    cfg = cluster_job_config(run_id)
    clock = SteppedClock()
    launcher = Launcher(
        launcher_api, kind, kind.build(cfg), options={"timeout_s": 3600, "clock": clock}
    ).start()
    gke.provision(launcher.job_uid(gke, cfg.name))
    gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    launcher.wait_for_line("admitted by Kueue")
    clock.jump(3600)

    error = launcher.error()
    assert isinstance(error, JobTimedOut), error
    gke.gone(kind, cfg.name)


@pytest.mark.parametrize("kind_name", JOB_KINDS)
def test_sigterm_deletes_the_running_job_and_every_pod(
    plane, gke, admin, launcher_token, run_id, tmp_path, kind_name
):
    kind = job_kind(kind_name)
    cfg = cluster_job_config(run_id)
    process = LauncherProcess(plane, launcher_token, kind_name, kind.build(cfg), tmp_path)
    gke.provision(gke.job_uid(kind, cfg.name, process.running))
    gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    process.wait_for_output("admitted by Kueue", admin)

    assert process.terminate() == 143
    assert "cancelled" in process.output
    gke.gone(kind, cfg.name)


def test_a_retry_adopts_the_job_its_killed_predecessor_left_running(
    plane, gke, admin, launcher_api, launcher_token, run_id, tmp_path
):
    kind = job_kind("jobset")
    cfg = cluster_job_config(run_id)
    first = LauncherProcess(plane, launcher_token, "jobset", kind.build(cfg), tmp_path)
    gke.provision(gke.job_uid(kind, cfg.name, first.running))
    pods = gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    first.wait_for_output("admitted by Kueue", admin)
    first.kill()  # the launch pod died: no cleanup ran

    retry = Launcher(launcher_api, kind, kind.build(cfg)).start()
    retry.wait_for_line("adopting existing JobSet")
    for rank, pod in enumerate(sorted(pods, key=kind.rank)):
        gke.write_log(pod, kind.container, node_lines(rank, f"node {rank} done"))
        gke.end(pod, 0)
    outcome = retry.result()
    assert outcome.adopted and outcome.name == cfg.name
    # The retry made no second job for the same results prefix.
    same_prefix = f"{RESULTS_HASH_LABEL}={results_hash(cfg.results_uri)}"
    jobs = admin.list(
        kind.resource.api_version, kind.resource.kind, "batch-inference", labelSelector=same_prefix
    )
    assert [j["metadata"]["name"] for j in jobs] == [cfg.name]


def test_eviction_is_reported_and_the_readmitted_job_runs_to_the_end(gke, admin, launcher_api, run_id):
    kind = job_kind("jobset")
    cfg = cluster_job_config(run_id)
    # Watches the API server ends every second: the launcher resumes each from the last
    # resourceVersion (bookmarks keep it current) and must miss none of the changes below.
    launcher = Launcher(launcher_api, kind, kind.build(cfg), options={"watch_timeout_s": 1}).start()
    uid = launcher.job_uid(gke, cfg.name)
    gke.provision(uid)
    gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    launcher.wait_for_line("admitted by Kueue")

    (workload,) = gke.workloads(uid)
    admin.merge_patch(
        KUEUE, "Workload", workload["metadata"]["name"], "batch-inference", {"spec": {"active": False}}
    )
    launcher.wait_for_line("evicted")
    launcher.wait_for_line("suspended again after admission")
    admin.merge_patch(
        KUEUE, "Workload", workload["metadata"]["name"], "batch-inference", {"spec": {"active": True}}
    )
    gke.provision(uid)
    pods = gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    for pod in pods:
        gke.end(pod, 0)
    outcome = launcher.result()
    assert outcome.held_seconds is not None and outcome.held_seconds > 0


def test_a_webhook_rejection_is_one_line(launcher_api, run_id):
    kind = job_kind("trainjob")
    cfg = cluster_job_config(run_id)
    manifest = kind.build(cfg)
    # Trainer's torch plugin owns torchrun's rendezvous variables and rejects a TrainJob that sets one.
    manifest["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
    launcher = Launcher(launcher_api, kind, manifest).start()
    error = launcher.error()
    assert isinstance(error, LauncherError) and not isinstance(error, JobFailed)
    assert len(str(error).splitlines()) == 1
    assert "denied the request" in str(error) and "PET_NNODES" in str(error)


def test_quota_exhausted_the_second_job_waits_and_says_why(gke, admin, launcher_api, run_id):
    kind = job_kind("jobset")
    queue = admin.get(KUEUE, "ClusterQueue", "dws-cluster-queue")
    resources = queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"]
    original = [dict(r) for r in resources]
    for r in resources:
        if r["name"] == "nvidia.com/gpu":
            r["nominalQuota"] = 16  # one 2 x 8-GPU job
    patch = {"spec": {"resourceGroups": queue["spec"]["resourceGroups"]}}
    admin.merge_patch(KUEUE, "ClusterQueue", "dws-cluster-queue", None, patch)
    try:
        first_cfg = cluster_job_config(run_id + "-a")
        second_cfg = cluster_job_config(run_id + "-b")
        first = Launcher(launcher_api, kind, kind.build(first_cfg)).start()
        gke.provision(first.job_uid(gke, first_cfg.name))
        first_pods = gke.running_pods(kind.pod_selector(first_cfg.name), 2)
        second = Launcher(launcher_api, kind, kind.build(second_cfg)).start()
        line = second.wait_for_line("insufficient unused quota")
        assert "nvidia.com/gpu" in line
        for pod in first_pods:
            gke.end(pod, 0)
        first.result()
        gke.provision(second.job_uid(gke, second_cfg.name))
        for pod in gke.running_pods(kind.pod_selector(second_cfg.name), 2):
            gke.end(pod, 0)
        second.result()
    finally:
        queue = admin.get(KUEUE, "ClusterQueue", "dws-cluster-queue")
        queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"] = original
        admin.merge_patch(
            KUEUE,
            "ClusterQueue",
            "dws-cluster-queue",
            None,
            {"spec": {"resourceGroups": queue["spec"]["resourceGroups"]}},
        )


def test_kueue_without_the_kinds_integration_is_named(plane, gke, launcher_api, run_id):
    kind = job_kind("pytorchjob")
    plane.start_kueue(frameworks=("batch/job", "jobset.x-k8s.io/jobset", "trainer.kubeflow.org/trainjob"))
    try:
        cfg = cluster_job_config(run_id)
        clock = SteppedClock()
        launcher = Launcher(
            launcher_api, kind, kind.build(cfg), options={"timeout_s": 3600, "clock": clock}
        ).start()
        line = launcher.wait_for_line("integration enabled")
        assert "kubeflow.org/pytorchjob" in line
        clock.jump(3600)
        assert isinstance(launcher.error(), JobTimedOut)
        gke.gone(kind, cfg.name)
    finally:
        plane.start_kueue(frameworks=KUEUE_FRAMEWORKS)


def _queue_behind(admin, name: str, check_parameters: dict | None) -> str:
    """A LocalQueue ``name`` in the job namespace, on a ClusterQueue gated by a provisioning admission
    check (with its own ProvisioningRequestConfig when ``check_parameters`` is given, else a missing one)."""
    config = f"{name}-config"
    if check_parameters is not None:
        admin.apply(
            {
                "apiVersion": KUEUE,
                "kind": "ProvisioningRequestConfig",
                "metadata": {"name": config},
                "spec": {
                    "provisioningClassName": "queued-provisioning.gke.io",
                    "managedResources": ["nvidia.com/gpu"],
                    **check_parameters,
                },
            }
        )
    admin.apply(
        {
            "apiVersion": KUEUE,
            "kind": "AdmissionCheck",
            "metadata": {"name": f"{name}-check"},
            "spec": {
                "controllerName": "kueue.x-k8s.io/provisioning-request",
                "parameters": {
                    "apiGroup": "kueue.x-k8s.io",
                    "kind": "ProvisioningRequestConfig",
                    "name": config,
                },
            },
        }
    )
    admin.apply(
        {
            "apiVersion": KUEUE,
            "kind": "ClusterQueue",
            "metadata": {"name": f"{name}-cq"},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": "dws-flavor",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": 100000},
                                    {"name": "memory", "nominalQuota": "100000Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": 10000},
                                ],
                            }
                        ],
                    }
                ],
                "admissionChecksStrategy": {"admissionChecks": [{"name": f"{name}-check"}]},
            },
        }
    )
    admin.apply(
        {
            "apiVersion": KUEUE,
            "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": "batch-inference"},
            "spec": {"clusterQueue": f"{name}-cq"},
        }
    )
    return name


def test_an_inactive_dws_queue_is_explained_in_the_first_report(gke, admin, launcher_api, run_id):
    """The admission check names a ProvisioningRequestConfig that does not exist: Kueue keeps the
    queue inactive, and the launcher says so at once rather than repeating the Workload's state."""
    queue = _queue_behind(admin, "no-config-queue", None)
    kind = job_kind("trainjob")
    cfg = cluster_job_config(run_id, queue=queue)
    clock = SteppedClock()
    launcher = Launcher(
        launcher_api, kind, kind.build(cfg), options={"timeout_s": 3600, "clock": clock}
    ).start()
    line = launcher.wait_for_line(f"LocalQueue batch-inference/{queue} is inactive")
    assert "no-config-queue-cq" in line, line  # names the ClusterQueue to look at
    assert launcher.lines.index(line) < 8, "said in the first report, not after waiting"
    clock.jump(3600)
    assert isinstance(launcher.error(), JobTimedOut)
    gke.gone(kind, cfg.name)


def test_dws_failing_to_provision_rejects_the_workload_and_the_job_is_deleted(
    gke, admin, launcher_api, run_id
):
    queue = _queue_behind(admin, "no-retry-queue", {"retryStrategy": {"backoffLimitCount": 0}})
    kind = job_kind("jobset")
    cfg = cluster_job_config(run_id, queue=queue)
    launcher = Launcher(launcher_api, kind, kind.build(cfg)).start()
    uid = launcher.job_uid(gke, cfg.name)
    request = gke.pending_provisioning_request(uid)
    gke.answer(request, "Failed", "OutOfResources", "No capacity for a3-ultragpu-8g in us-central1-b")

    error = launcher.error()
    assert isinstance(error, AdmissionRejected), error
    assert "no-retry-queue-check" in str(error)
    gke.gone(kind, cfg.name)


def test_a_rank_killed_without_a_log_is_named_from_its_pods_status(gke, launcher_api, run_id):
    kind = job_kind("jobset")
    cfg = cluster_job_config(run_id, backoff_limit=0)
    launcher = Launcher(launcher_api, kind, kind.build(cfg)).start()
    gke.provision(launcher.job_uid(gke, cfg.name))
    pods = sorted(gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes), key=kind.rank)
    gke.end(pods[1], 137, reason="OOMKilled")  # the kernel killed it: it printed nothing

    error = launcher.error()
    assert isinstance(error, JobFailed), error
    first_line = str(error).splitlines()[0]
    assert "node-1" in first_line and "exit code 137 (OOMKilled)" in first_line, first_line
    assert pods[1]["spec"]["nodeName"] in first_line  # which machine, for a node-level cause


def test_a_job_without_a_queue_runs_at_once_outside_kueue(gke, launcher_api, run_id):
    kind = job_kind("jobset")
    cfg = cluster_job_config(run_id, queue=None)
    launcher = Launcher(launcher_api, kind, kind.build(cfg)).start()
    pods = gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    assert not gke.workloads(launcher.job_uid(gke, cfg.name)), "Kueue must leave it alone"
    for pod in pods:
        gke.end(pod, 0)
    outcome = launcher.result()
    assert outcome.admitted_at is not None and outcome.held_seconds is not None


@pytest.mark.parametrize("missing", ["namespace", "queue"])
def test_a_missing_namespace_or_local_queue_is_a_one_line_error_before_any_job(
    admin, launcher_api, run_id, missing
):
    kind = job_kind("trainjob")
    overrides = {"namespace": "no-such-namespace"} if missing == "namespace" else {"queue": "no-such-queue"}
    cfg = cluster_job_config(run_id, **overrides)
    error = Launcher(launcher_api, kind, kind.build(cfg)).start().error()
    assert isinstance(error, LauncherError)
    assert len(str(error).splitlines()) == 1 and (
        "no-such-namespace" in str(error) or "no-such-queue" in str(error)
    )
    assert not admin.list(
        kind.resource.api_version,
        kind.resource.kind,
        "batch-inference",
        labelSelector=f"{RESULTS_HASH_LABEL}={results_hash(cfg.results_uri)}",
    )


def test_a_retry_replaces_the_finished_job_of_its_earlier_attempt(gke, launcher_api, run_id):
    kind = job_kind("pytorchjob")
    cfg = cluster_job_config(run_id, backoff_limit=0)
    first = Launcher(launcher_api, kind, kind.build(cfg)).start()
    gke.provision(first.job_uid(gke, cfg.name))
    pods = gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    gke.end(pods[0], 1)
    assert isinstance(first.error(), JobFailed)

    retry = Launcher(launcher_api, kind, kind.build(cfg)).start()
    retry.wait_for_line("from an earlier attempt")
    created = retry.wait_for_line(lambda line: line.startswith(f"created {kind.resource.kind}"))
    gke.provision(created.split("(uid ")[1].rstrip(")"))
    for pod in gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes):
        gke.end(pod, 0)
    outcome = retry.result()
    assert not outcome.adopted and outcome.name == cfg.name
