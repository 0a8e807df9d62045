"""Submit and schedule the batch_inference pipeline on Vertex AI Pipelines.

Through google-cloud-aiplatform's ``PipelineJob`` (the ``vertex`` extra, imported only here),
with Application Default Credentials. Like ``pipelines.submit`` for Kubeflow Pipelines, every
function checks the run's parameters locally first, compiles the Vertex flavour (or takes a
compiled package), and returns the URL of what it created; failures a user can fix raise
``SubmitError`` or ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from components.images import Images
from pipelines.batch_inference import PIPELINE_NAME, VERTEX
from pipelines.cron import parse_cron
from pipelines.submit import SubmitError, Submitted, check_arguments, compiled_package, pushed_images
from worker.storage import is_gcs

VERTEX_EXTRA = "pip install 'kfp-batch-inference[vertex]'"
_CONSOLE = (
    "https://console.cloud.google.com/vertex-ai/locations/{location}/pipelines/{kind}/{id}?project={project}"
)

_NETWORK = re.compile(r"projects/[0-9]+/global/networks/[a-z]([-a-z0-9]*[a-z0-9])?")


def check_network(network: str | None) -> str | None:
    """The VPC network a Vertex run is peered with, as Vertex wants it written; None for none.

    Raises:
        ValueError: Not ``projects/PROJECT_NUMBER/global/networks/NAME`` (Vertex takes the
            project's number here, not its id).
    """
    if not network:
        return None
    if not _NETWORK.fullmatch(network):
        raise ValueError(
            f"--network {network!r}: write it projects/PROJECT_NUMBER/global/networks/NAME "
            "(the project's number: gcloud projects describe PROJECT --format='value(projectNumber)')"
        )
    return network


def _aiplatform():
    try:
        from google.cloud import aiplatform
    except ImportError:
        raise SubmitError(f"Vertex AI support is not installed: {VERTEX_EXTRA}") from None
    return aiplatform


def _google_credentials():
    """Application Default Credentials, or a one-line SubmitError saying how to get them."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except DefaultCredentialsError:
        raise SubmitError(
            "no Google Cloud credentials: run `gcloud auth application-default login`, or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
        ) from None
    return credentials


@contextlib.contextmanager
def _vertex_errors(action: str) -> Iterator[None]:
    import logging

    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    # aiplatform's module loggers print INFO chatter and tracebacks of failures it recovers
    # from (e.g. a pipeline-root bucket it may not create) to stdout, each through its own
    # handler; the caller reports the outcome itself.
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("google.cloud.aiplatform")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    except auth_exceptions.GoogleAuthError as exc:
        raise SubmitError(
            f"Google Cloud credentials were refused while trying to {action}: "
            f"{_first_line(exc)}; run `gcloud auth application-default login`"
        ) from None
    except api_exceptions.GoogleAPIError as exc:
        raise SubmitError(f"Vertex AI refused to {action}: {_first_line(exc)}") from None
    finally:
        for logger, level in zip(loggers, levels, strict=False):
            logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _vertex_job(
    aiplatform,
    project: str,
    location: str,
    pipeline_root: str,
    arguments: Mapping[str, Any],
    path: Path,
    run_name: str | None,
    credentials,
):
    if not is_gcs(pipeline_root):
        raise ValueError(f"--pipeline-root must be a gs:// prefix, got {pipeline_root!r}")
    return aiplatform.PipelineJob(
        display_name=run_name or PIPELINE_NAME,
        template_path=str(path),
        pipeline_root=pipeline_root,
        parameter_values=dict(arguments),
        project=project,
        location=location,
        credentials=credentials,
    )


def _console_url(resource_name: str, kind: str) -> str:
    """The Cloud Console page of ``projects/P/locations/L/<collection>/ID``."""
    parts = resource_name.split("/")
    return _CONSOLE.format(project=parts[1], location=parts[3], kind=kind, id=parts[-1])


def submit_vertex(
    project: str,
    location: str,
    pipeline_root: str,
    arguments: Mapping[str, Any],
    *,
    run_name: str | None = None,
    service_account: str | None = None,
    network: str | None = None,
    package: str | Path | None = None,
    images: Images | None = None,
    wait: bool = False,
    credentials=None,
) -> Submitted:
    """Start one run on Vertex AI Pipelines.

    Args:
        project: The GCP project to run in.
        location: The Vertex AI region, e.g. ``us-central1``.
        pipeline_root: gs:// prefix for the run's artifacts (CSV, Parquet, HTML report).
        arguments: Pipeline parameters to set; the rest keep their defaults.
        run_name: The run's display name.
        service_account: The GCP service account the run acts as (default: Compute Engine's).
        network: The VPC network the run's tasks are peered with,
            ``projects/PROJECT_NUMBER/global/networks/NETWORK``: the way to a GKE cluster whose
            control plane has only a private endpoint (see docs/running.md).
        package: A compiled pipeline instead of a fresh compile of the Vertex flavour.
        images: The images the pipeline names, checked (``pushed_images``); None: the package's,
            else those in the environment, with ``arguments``' image as the job's.
        wait: Wait until the run ends; a run that does not succeed raises SubmitError.
        credentials: Google credentials (default: Application Default Credentials).

    Returns:
        The run.

    Raises:
        SubmitError: The vertex extra is missing, there are no credentials, or Vertex refused.
        ValueError: A parameter is invalid.
    """
    images = images or pushed_images(package, worker_image=arguments.get("image"))
    arguments = check_arguments(arguments, VERTEX, images)
    network = check_network(network)
    aiplatform = _aiplatform()
    credentials = credentials or _google_credentials()
    with compiled_package(VERTEX, package, images) as path, _vertex_errors("create the run"):
        job = _vertex_job(
            aiplatform, project, location, pipeline_root, arguments, path, run_name, credentials
        )
        job.submit(service_account=service_account or None, network=network)
    url = _console_url(job.resource_name, "runs")
    if not wait:
        return Submitted("run", job.resource_name.rsplit("/", 1)[-1], url)
    with _vertex_errors("follow the run"):
        job.wait()
    state = job.state.name.removeprefix("PIPELINE_STATE_")
    if state != "SUCCEEDED":
        raise SubmitError(f"run {job.resource_name} ended {state}: {url}")
    return Submitted("run", job.resource_name.rsplit("/", 1)[-1], url, state)


def schedule_vertex(
    project: str,
    location: str,
    pipeline_root: str,
    arguments: Mapping[str, Any],
    cron: str,
    *,
    name: str | None = None,
    service_account: str | None = None,
    network: str | None = None,
    package: str | Path | None = None,
    images: Images | None = None,
    credentials=None,
) -> Submitted:
    """Create a Vertex AI pipeline schedule (at most one run at a time).

    Args:
        project: The GCP project.
        location: The Vertex AI region.
        pipeline_root: gs:// prefix for the runs' artifacts.
        arguments: Pipeline parameters to set; the rest keep their defaults.
        cron: Standard 5-field cron, optionally ``TZ=Area/City``-prefixed (default: UTC).
        name: The schedule's display name (default: ``batch-inference <cron>``).
        service_account: The GCP service account the runs act as.
        network: The VPC network the runs' tasks are peered with (as for ``submit_vertex``).
        package: A compiled pipeline instead of a fresh compile of the Vertex flavour.
        images: The images the pipeline names, checked (``pushed_images``); None: the package's,
            else those in the environment, with ``arguments``' image as the job's.
        credentials: Google credentials (default: Application Default Credentials).

    Returns:
        The schedule.

    Raises:
        CronError: ``cron`` is not valid standard cron.
        SubmitError: The vertex extra is missing, there are no credentials, or Vertex refused.
        ValueError: A parameter is invalid.
    """
    vertex_cron = parse_cron(cron).for_vertex()
    images = images or pushed_images(package, worker_image=arguments.get("image"))
    arguments = check_arguments(arguments, VERTEX, images)
    network = check_network(network)
    aiplatform = _aiplatform()
    credentials = credentials or _google_credentials()
    with compiled_package(VERTEX, package, images) as path, _vertex_errors("create the schedule"):
        job = _vertex_job(aiplatform, project, location, pipeline_root, arguments, path, None, credentials)
        schedule = job.create_schedule(
            cron=vertex_cron,
            display_name=name or f"{PIPELINE_NAME} {cron}"[:128],
            max_concurrent_run_count=1,
            service_account=service_account or None,
            network=network,
        )
    return Submitted(
        "schedule",
        schedule.resource_name.rsplit("/", 1)[-1],
        _console_url(schedule.resource_name, "schedules"),
    )
