"""The job record: the times GPU-hours and the queue wait are computed from."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from components.launch.job_record import JobRecord, record_job
from components.launch.launch import LaunchRequest, LaunchResult
from pipelines.batch_inference import launch_inputs

START = datetime(2026, 10, 1, 2, 0, tzinfo=timezone.utc)


def _request(**overrides) -> LaunchRequest:
    values = {name: spec.default for name, spec in launch_inputs().items()}
    values.update(
        images_uri="gs://images/coco", results_root="gs://results/runs", run_id="run-1", **overrides
    )
    return LaunchRequest(**values)


def test_a_kubernetes_record_splits_the_wait_for_capacity_from_the_time_the_gpus_were_held(tmp_path):
    admitted, ended = START + timedelta(hours=3), START + timedelta(hours=3, minutes=30)
    result = LaunchResult("kubernetes", "gs://results/runs/run-1", "bi-run-1", 2, 16, admitted, ended)

    record = record_job(_request(backend="kubernetes"), result, START, ended + timedelta(seconds=4))
    record.write(tmp_path / "job.json")

    assert JobRecord.read(tmp_path / "job.json") == record
    assert (record.job_seconds, record.queue_seconds, record.held_seconds) == (12604.0, 10800.0, 1800.0)
    assert (record.admitted_at, record.ended_at) == ("2026-10-01T05:00:00+00:00", "2026-10-01T05:30:00+00:00")
    # The report's "what ran" names the job kind and the image the pods ran.
    request = _request(backend="kubernetes")
    assert (record.parameters["job_kind"], record.parameters["image"]) == (request.job_kind, request.image)


def test_an_evicted_jobs_record_holds_the_gpus_only_while_admitted():
    admitted, ended = START + timedelta(hours=1), START + timedelta(hours=4)
    result = LaunchResult("kubernetes", "gs://r/runs/run-1", "bi-run-1", 2, 16, admitted, ended, 3600.0)

    record = record_job(_request(backend="kubernetes"), result, START, ended)

    # Queued for an hour before its first admission; evicted for two hours of the three after it.
    assert (record.held_seconds, record.queue_seconds, record.job_seconds) == (3600.0, 3600.0, 4 * 3600.0)


def test_a_local_record_holds_the_gpus_for_torchruns_run_and_waits_for_nothing():
    admitted, ended = START + timedelta(seconds=2), START + timedelta(seconds=62)
    result = LaunchResult("local", "gs://results/runs/run-1", "", 1, 2, admitted, ended)

    record = record_job(_request(), result, START, ended)

    assert (record.held_seconds, record.queue_seconds) == (60.0, None)


def test_without_admission_times_the_record_says_unknown():
    result = LaunchResult("kubernetes", "gs://results/runs/run-1", "bi-run-1", 2, 16)  # an adopted job

    record = record_job(_request(backend="kubernetes"), result, START, START + timedelta(hours=1))

    assert (record.admitted_at, record.ended_at, record.held_seconds, record.queue_seconds) == (
        "",
        "",
        None,
        None,
    )
    assert record.job_seconds == 3600.0
