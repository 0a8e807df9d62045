"""components.launch.launch: a run's parameters become the worker's arguments and the Kubernetes job.

The kubernetes backend runs against the Kubernetes API stand-in of the launcher tests; the
local backend runs in the pipeline tests.
"""

from __future__ import annotations

import json

import pytest

from components.launch.kubernetes.api import KubernetesApi
from components.launch.kubernetes.kinds import JOB_KINDS
from components.launch.launch import LaunchRequest, launch
from pipelines.batch_inference import launch_inputs
from tests.support.k8s_stand_in import KubeApiStandIn, Step, listed_workloads
from worker.fingerprint import RunMismatch
from worker.storage import join, read_text, write_text

pytestmark = pytest.mark.timeout(60)


def request(**overrides) -> LaunchRequest:
    """A request with the pipeline's defaults, as a run from the KFP UI would send it."""
    values = {name: spec.default for name, spec in launch_inputs().items()}
    values.update(images_uri="gs://images/coco/val2017", results_root="gs://results/runs", run_id="run-1")
    values.update(image="registry.example/kfp-batch-inference:1.0")  # the pipeline's is a placeholder
    values.update(overrides)
    return LaunchRequest(**values)


def test_results_go_to_a_prefix_per_run_unless_one_is_given():
    assert request().results_uri == "gs://results/runs/run-1"
    assert request(results_prefix="gs://results/resume-me/").results_uri == "gs://results/resume-me"


def test_worker_args_carry_the_run_and_extra_flags_win():
    args = request(batch_size=128, extra_worker_args="--assignment dynamic --batch-size 64").worker_args()
    assert args[:6] == [
        "--input",
        "gs://images/coco/val2017",
        "--output",
        "gs://results/runs/run-1",
        "--model",
        "google/vit-base-patch16-224",
    ]
    assert args[-4:] == ["--assignment", "dynamic", "--batch-size", "64"]
    assert "--overwrite" not in args and "--overwrite" in request(overwrite=True).worker_args()


def test_job_config_maps_empty_to_unset_and_names_networks():
    cfg = request(
        queue="",
        priority_class="",
        service_account="",
        max_run_duration_seconds=0,
        rdma_networks="default, gvnic-1, rdma-a",
    ).job_config()
    assert (cfg.queue, cfg.priority_class, cfg.service_account, cfg.max_run_duration_seconds) == (None,) * 4
    assert cfg.network_interfaces == (("eth0", "default"), ("eth1", "gvnic-1"), ("eth2", "rdma-a"))
    assert cfg.results_uri == "gs://results/runs/run-1" and cfg.nodes == 2 and cfg.gpus_per_node == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"backend": "slurm"}, "backend must be one of local, kubernetes"),
        ({"images_uri": ""}, "images_uri is empty"),
        ({"results_root": ""}, "results_root is empty"),
        ({"images_uri": "/data/images"}, "images_uri must be a gs:// prefix"),
        ({"gke_cluster": "c"}, "gke_project, gke_location and gke_cluster go together"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"job_kind": "mpijob"}, "job_kind must be one of pytorchjob, trainjob, jobset"),
    ],
)
def test_invalid_requests_fail_before_anything_starts(overrides, message):
    with pytest.raises(ValueError, match=message):
        launch(request(**overrides))


def test_a_results_prefix_of_another_run_fails_before_any_job(gcs):
    """The worker would refuse it too, but only once DWS has provisioned its GPUs."""
    prefix = f"gs://{gcs.new_bucket('taken')}/run"
    record = {"input": "gs://images/other", "model": "m", "incremental": False, "plan_sha256": "0" * 64}
    write_text(join(prefix, "run.json"), json.dumps(record))
    write_text(join(prefix, "parts", "part-00000-0123456789abcdef.csv"), "image_id\n")
    with KubeApiStandIn(kind=JOB_KINDS[0]) as cluster:
        api = KubernetesApi(cluster.url, token="t")
        with pytest.raises(RunMismatch, match="input was gs://images/other, now gs://images/coco/val2017"):
            launch(request(results_prefix=prefix), api=api)
        assert cluster.calls("POST", cluster.jobs_path) == []
    assert read_text(join(prefix, "run.json")) == json.dumps(record), "a refusal changes nothing"


def commands(obj) -> list[list[str]]:
    """Every ``command`` list in a manifest, wherever its kind puts the container."""
    if isinstance(obj, dict):
        found = [obj["command"]] if isinstance(obj.get("command"), list) else []
        return found + [c for value in obj.values() for c in commands(value)]
    if isinstance(obj, list):
        return [c for value in obj for c in commands(value)]
    return []


@pytest.mark.parametrize("job_kind", JOB_KINDS)
def test_kubernetes_backend_creates_the_job_of_its_kind_and_waits_for_it(job_kind, gcs):
    # gcs: the launcher reads the results prefix's run.json (on the emulator) before the job.
    req = request(nodes=3, gpus_per_node=4, job_kind=job_kind)
    name = req.job_config().name
    lines: list[str] = []
    with KubeApiStandIn(kind=job_kind) as cluster:
        cluster.script(
            Step(
                listed_workloads,
                lambda s: (s.admit(name), s.add_pod(name, 0, ["all shards done"], state="terminated")),
            ),
            Step(cluster.followed_log(0), lambda s: s.finish(name, succeeded=True)),
        )
        result = launch(req, log=lines.append, api=KubernetesApi(cluster.url, token="t"))
        created = cluster.calls("POST", cluster.jobs_path)
    assert (result.backend, result.job_name, result.nodes, result.world_size) == ("kubernetes", name, 3, 12)
    assert result.results_uri == "gs://results/runs/run-1"
    assert len(created) == 1
    body = created[0].body
    assert body["metadata"]["namespace"] == "batch-inference"
    assert body["kind"] == cluster.controller.kind
    (command,) = {c[-1] for c in commands(body)}
    assert "--input gs://images/coco/val2017 --output gs://results/runs/run-1" in command
    assert any(line.endswith("] all shards done") for line in lines)
    assert result.admitted_at is not None and result.ended_at is not None
    assert result.admitted_at <= result.ended_at
