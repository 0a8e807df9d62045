"""The pipeline is the one home of the run's defaults: the launch job config agrees with it."""

from __future__ import annotations

from components.launch.launch import KUBERNETES, LaunchRequest
from pipelines.batch_inference import launch_inputs


def _request_with_the_pipeline_defaults() -> LaunchRequest:
    values = {name: spec.default for name, spec in launch_inputs().items()}
    values.update(images_uri="gs://bkt/images", results_root="gs://bkt/results", backend=KUBERNETES)
    return LaunchRequest(run_id="defaults", **values)


def test_the_job_config_defaults_are_the_pipelines():
    # Built from the pipeline's defaults, the job config equals the job config's own defaults
    # in every field that the request does not derive per run (name, image, arguments, prefix).
    cfg = _request_with_the_pipeline_defaults().job_config()
    own_defaults = type(cfg)(
        name=cfg.name, image=cfg.image, worker_args=cfg.worker_args, results_uri=cfg.results_uri
    )
    assert cfg == own_defaults


def test_every_launch_request_field_but_the_run_id_is_a_pipeline_parameter():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(LaunchRequest)}
    assert set(launch_inputs()) == fields - {"run_id"}


def test_the_job_kind_parameter_names_every_kind():
    from components.launch.kubernetes.kinds import DEFAULT_JOB_KIND, JOB_KINDS

    spec = launch_inputs()["job_kind"]
    assert spec.default == DEFAULT_JOB_KIND
    assert all(kind in spec.description for kind in JOB_KINDS)
