"""The launch step's own entry point (``launch``) on the real control plane: its job record.

What the KFP launch task runs for the kubernetes backend, with the pipeline's defaults: the
results prefix checked in GCS (the emulator), the job built for the kind, followed to its end as
the overlay's service account, and the record the aggregate step reads: GPU-hours counted from
Kueue's admission, the wait for DWS capacity apart.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from components.launch.job_record import record_job
from components.launch.kubernetes.kinds import job_kind
from components.launch.launch import LaunchRequest, launch
from pipelines.batch_inference import launch_inputs

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("kind_name", ["trainjob"])
def test_the_launch_step_records_gpu_hours_from_admission_not_from_the_dws_wait(
    gcs, gke, launcher_api, run_id, kind_name
):
    bucket = gcs.new_bucket("launch")
    values = {name: spec.default for name, spec in launch_inputs().items()}
    values.update(
        images_uri=f"gs://{bucket}/images",
        results_root=f"gs://{bucket}/runs",
        run_id=run_id,
        backend="kubernetes",
        job_kind=kind_name,
        image="registry.example/kfp-batch-inference:1.0",
        nodes=2,
        gpus_per_node=8,
    )
    request = LaunchRequest(**values)
    kind = job_kind(kind_name)
    cfg = request.job_config()
    lines: list[str] = []
    done: dict = {}
    started = datetime.now(timezone.utc)

    def step() -> None:
        try:
            done["result"] = launch(request, log=lines.append, api=launcher_api)
        except BaseException as e:  # handed to the test's thread
            done["error"] = e

    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    uid = gke.job_uid(kind, cfg.name, thread.is_alive)
    gke.pending_provisioning_request(uid)
    held_back = datetime.now(timezone.utc)  # DWS has not answered yet: the nodes do not exist
    gke.provision(uid)
    pods = gke.running_pods(kind.pod_selector(cfg.name), cfg.nodes)
    for pod in pods:
        gke.end(pod, 0)
    thread.join(timeout=120)
    assert "error" not in done, done.get("error")
    record = record_job(request, done["result"], started, datetime.now(timezone.utc))

    assert record.backend == "kubernetes" and record.job_name == cfg.name
    assert (record.nodes, record.world_size) == (2, 16)
    assert record.parameters["job_kind"] == kind_name
    admitted = datetime.fromisoformat(record.admitted_at)
    # (the record keeps whole seconds)
    assert admitted >= held_back.replace(microsecond=0), (
        "GPU time starts at admission, after DWS provisioned the nodes"
    )
    assert record.queue_seconds >= (held_back - started).total_seconds() - 1
    assert 0 < record.held_seconds <= record.job_seconds - record.queue_seconds + 1
