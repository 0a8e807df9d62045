"""Submit and schedule the batch_inference pipeline on Kubeflow Pipelines or Vertex AI Pipelines.

The logic behind ``python -m pipelines submit`` and ``schedule`` (and the notebook). Every
function checks the run's parameters locally first (the launch step's own checks, so a typo
fails now rather than an hour into a run), compiles the flavour the target needs (or takes a
compiled package), and returns the URL of what it created. Failures a user can fix (no
credentials, an unreachable host, a refusal by the server, a bad cron string) raise
``SubmitError`` or ``ValueError`` with a one-line message.

* **Kubeflow Pipelines** through ``kfp.Client``: an experiment (created if missing), then a
  run or a recurring run. KFP's cron has 6 fields, seconds first; ``pipelines.cron`` converts.
* **Vertex AI Pipelines**: ``pipelines.vertex``, on the checks and packaging here.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from components.images import TASK_IMAGE, WORKER_IMAGE, Images, check_image, is_placeholder
from pipelines.batch_inference import (
    KUBEFLOW,
    PARAMETER_TYPES,
    PIPELINE_NAME,
    PIPELINES,
    VERTEX,
    compile_pipeline,
    launch_inputs,
)
from pipelines.cron import parse_cron

DEFAULT_EXPERIMENT = PIPELINE_NAME
_HEALTHZ = "/apis/v2beta1/healthz"
_PROBE_TIMEOUT_S = 15


class SubmitError(RuntimeError):
    """The target refused or could not be reached; the message is one line and says what to do."""


@dataclass(frozen=True)
class Submitted:
    """What a submission created.

    Attributes:
        kind: "run" or "schedule".
        id: The run's or schedule's id on the target.
        url: Where to see it in the target's UI.
        state: The final state when the submission waited for the run, else "".
    """

    kind: str
    id: str
    url: str
    state: str = ""


def check_arguments(arguments: Mapping[str, Any], flavour: str, images: Images) -> dict[str, Any]:
    """Check a run's pipeline parameters before anything is sent.

    Args:
        arguments: The parameters to set; the others keep the compiled defaults.
        flavour: ``kubeflow`` or ``vertex``.
        images: The images of the pipeline sent (its ``image`` parameter's default).

    Returns:
        The arguments, as a plain dict.

    Raises:
        ValueError: An unknown parameter, or one the launch step would reject.
    """
    from components.launch.launch import KUBERNETES, LaunchRequest

    inputs = PIPELINES[flavour].component_spec.inputs
    unknown = sorted(set(arguments) - set(inputs))
    if unknown:
        raise ValueError(f"unknown pipeline parameter(s): {', '.join(unknown)}")
    for name, value in arguments.items():
        kind = PARAMETER_TYPES[inputs[name].type]
        # bool is an int to Python, never to KFP.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"pipeline parameter {name} takes a {kind.__name__}, got {value!r}")
    launch = launch_inputs()
    values = (
        {name: spec.default for name, spec in launch.items()}
        | {"image": images.worker}
        | {k: v for k, v in arguments.items() if k in launch}
    )
    request = LaunchRequest(run_id="submit-check", **values)
    request.validate()
    if flavour == VERTEX and request.backend == KUBERNETES and not request.gke:
        raise ValueError(
            "on Vertex AI the launch step runs outside your GKE cluster: set gke_project, "
            "gke_location and gke_cluster"
        )
    return dict(arguments)


def _package_path(package: str | Path) -> Path:
    path = Path(package)
    if not path.is_file():
        raise ValueError(f"no compiled pipeline at {path}")
    return path


def package_images(package: str | Path) -> Images:
    """The images a compiled pipeline names: its tasks' (a placeholder first, if any is one)
    and its ``image`` parameter's default.
    """
    spec = next(yaml.safe_load_all(_package_path(package).read_text()))
    tasks = sorted(e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values())
    worker = spec["root"]["inputDefinitions"]["parameters"]["image"].get("defaultValue", "")
    return Images(next((t for t in tasks if is_placeholder(t)), tasks[0]), worker)


def pushed_images(
    package: str | Path | None = None, task_image: str | None = None, worker_image: str | None = None
) -> Images:
    """The images of a pipeline meant for a cluster, none of them a placeholder.

    Args:
        package: A compiled pipeline: its images, unless ``worker_image`` replaces its default.
        task_image: For a fresh compile, the tasks' image (--task-image); None: from the environment.
        worker_image: The job's pods' image (--image); None: the package's, else from the environment.

    Raises:
        ValueError: A placeholder or an empty image, in one line naming its flag.
    """
    if package:
        if task_image:
            raise ValueError(
                "--task-image: --package is compiled already; compile it with --task-image instead"
            )
        compiled = package_images(package)
        if is_placeholder(compiled.task):
            raise ValueError(
                f"--package {package} runs its tasks in the placeholder {compiled.task}: "
                "compile it with --task-image and --image (compiled/README.md)"
            )
        images = Images(compiled.task, worker_image or compiled.worker)
    else:
        images = Images(task_image or TASK_IMAGE, worker_image or WORKER_IMAGE)
        check_image("--task-image", images.task)
    check_image("--image", images.worker)
    return images


@contextlib.contextmanager
def compiled_package(flavour: str, package: str | Path | None, images: Images) -> Iterator[Path]:
    """The compiled pipeline to send: ``package`` when given, else a fresh compile of ``flavour``
    naming ``images``.
    """
    if package:
        yield _package_path(package)
        return
    with tempfile.TemporaryDirectory(prefix="batch-inference-") as tmp:
        yield compile_pipeline(flavour, Path(tmp) / f"{PIPELINE_NAME}-{flavour}.yaml", images)


# --- Kubeflow Pipelines -------------------------------------------------------------------


def _probe_kfp(host: str, token: str | None) -> None:
    """Reach KFP's health endpoint first: a clear one-line error beats kfp.Client's retries.

    kfp.Client retries a failing health check five times, five seconds apart, and reports
    an unreachable host with a urllib3 traceback; a login page (IAP, Dex) is not an error to it.
    """
    url = host.rstrip("/") + _HEALTHZ
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    # A redirect here is a login page: report it rather than follow it to the identity provider.
    # No proxies from the environment: kfp.Client, which comes next, does not use them either.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
    try:
        with opener.open(request, timeout=_PROBE_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 303, 307, 308, 401, 403):
            raise SubmitError(
                f"KFP at {host} wants credentials (HTTP {exc.code}): pass --kfp-token with a "
                "bearer token it accepts (e.g. `gcloud auth print-identity-token` behind IAP)"
            ) from None
        if exc.code == 404:
            raise SubmitError(
                f"no KFP API at {host} ({url} answered 404): give the KFP UI's base URL, "
                "e.g. http://localhost:8080 after `kubectl port-forward svc/ml-pipeline-ui "
                "8080:80 -n kubeflow`"
            ) from None
        raise SubmitError(f"KFP at {host} is not healthy: {url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(f"cannot reach KFP at {host}: {reason}") from None
    try:
        json.loads(body)
    except ValueError:
        raise SubmitError(
            f"{host} answered {url} with something other than KFP's JSON: is it the KFP "
            "endpoint, and does it want credentials (--kfp-token)?"
        ) from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        return None


@contextlib.contextmanager
def _kfp_errors(host: str, action: str) -> Iterator[None]:
    """Turn kfp.Client's failures into one-line SubmitErrors, and keep its prints off stdout."""
    import kfp_server_api
    import urllib3

    captured = io.StringIO()
    try:
        # kfp.Client prints its own "Experiment details: ..." lines and warns that it needs
        # KFP 2; the CLI prints the URLs itself.
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except kfp_server_api.ApiException as exc:
        raise SubmitError(
            f"KFP at {host} refused to {action}: HTTP {exc.status} {exc.reason}{_api_message(exc.body)}"
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise SubmitError(
            f"lost the connection to KFP at {host} while trying to {action}: {type(exc).__name__}"
        ) from None


def _api_message(body: Any) -> str:
    """The server's own message from an error body, on one line."""
    if not body:
        return ""
    try:
        message = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        message = str(body)
    message = " ".join(str(message).split())
    return f": {message[:300]}" if message else ""


def _kfp_client(host: str, token: str | None, namespace: str | None):
    import kfp

    _probe_kfp(host, token)
    with _kfp_errors(host, "connect"):
        return kfp.Client(host=host, existing_token=token or None, namespace=namespace or "kubeflow")


def _default_run_name() -> str:
    return f"{PIPELINE_NAME} {datetime.now():%Y-%m-%d %H:%M:%S}"


def _kfp_url(host: str, ui_host: str | None, route: str) -> str:
    return f"{(ui_host or host).rstrip('/')}/#/{route}"


def submit_kfp(
    host: str,
    arguments: Mapping[str, Any],
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    service_account: str | None = None,
    package: str | Path | None = None,
    images: Images | None = None,
    ui_host: str | None = None,
    wait: bool = False,
    timeout_s: int = 86400,
) -> Submitted:
    """Start one run on Kubeflow Pipelines.

    Args:
        host: KFP's base URL, e.g. ``http://localhost:8080`` (a port-forward of ml-pipeline-ui).
        arguments: Pipeline parameters to set; the rest keep their defaults.
        experiment: The experiment to file the run under (created if missing).
        run_name: The run's display name (default: the pipeline's name and the time).
        namespace: The KFP profile namespace on a multi-user install.
        token: A bearer token for an authenticated endpoint (IAP, OIDC).
        service_account: The Kubernetes service account the run's pods use.
        package: A compiled pipeline to send instead of a fresh compile of the Kubeflow flavour.
        images: The images the pipeline names, checked (``pushed_images``); None: the package's,
            else those in the environment, with ``arguments``' image as the job's.
        ui_host: The UI's base URL when it differs from ``host`` (for the printed link).
        wait: Wait until the run ends; a run that does not succeed raises SubmitError.
        timeout_s: How long to wait.

    Returns:
        The run.

    Raises:
        SubmitError: KFP is unreachable, wants credentials, refused, or the awaited run failed.
        ValueError: A parameter is invalid.
    """
    images = images or pushed_images(package, worker_image=arguments.get("image"))
    arguments = check_arguments(arguments, KUBEFLOW, images)
    client = _kfp_client(host, token, namespace)
    with compiled_package(KUBEFLOW, package, images) as path, _kfp_errors(host, "create the run"):
        result = client.create_run_from_pipeline_package(
            str(path),
            arguments=arguments,
            run_name=run_name or _default_run_name(),
            experiment_name=experiment,
            namespace=namespace or None,
            service_account=service_account or None,
        )
    run_id = result.run_id
    url = _kfp_url(host, ui_host, f"runs/details/{run_id}")
    if not wait:
        return Submitted("run", run_id, url)
    with _kfp_errors(host, "follow the run"):
        state = str(client.wait_for_run_completion(run_id, timeout=timeout_s).state)
    if state.upper() != "SUCCEEDED":
        raise SubmitError(f"run {run_id} ended {state}: {url}")
    return Submitted("run", run_id, url, state)


def schedule_kfp(
    host: str,
    arguments: Mapping[str, Any],
    cron: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    name: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    service_account: str | None = None,
    package: str | Path | None = None,
    images: Images | None = None,
    ui_host: str | None = None,
) -> Submitted:
    """Create a KFP recurring run.

    At most one run of the schedule runs at a time, and missed runs are not caught up (a
    paused nightly schedule resumes with one run, not a burst): an incremental run covers
    everything since the last good run anyway.

    Args:
        host: KFP's base URL.
        arguments: Pipeline parameters to set; the rest keep their defaults.
        cron: Standard 5-field cron (UTC); converted to KFP's 6 fields.
        experiment: The experiment the recurring run and its runs go under.
        name: The recurring run's display name (default: ``batch-inference <cron>``).
        namespace: The KFP profile namespace on a multi-user install.
        token: A bearer token for an authenticated endpoint.
        service_account: The Kubernetes service account the runs' pods use.
        package: A compiled pipeline instead of a fresh compile of the Kubeflow flavour.
        images: The images the pipeline names, checked (``pushed_images``); None: the package's,
            else those in the environment, with ``arguments``' image as the job's.
        ui_host: The UI's base URL when it differs from ``host``.

    Returns:
        The recurring run.

    Raises:
        CronError: ``cron`` is not valid standard cron, or has a time zone.
        SubmitError: KFP is unreachable, wants credentials, or refused.
        ValueError: A parameter is invalid.
    """
    kfp_cron = parse_cron(cron).for_kfp()  # before anything is sent
    images = images or pushed_images(package, worker_image=arguments.get("image"))
    arguments = check_arguments(arguments, KUBEFLOW, images)
    client = _kfp_client(host, token, namespace)
    with compiled_package(KUBEFLOW, package, images) as path, _kfp_errors(host, "create the recurring run"):
        experiment_id = client.create_experiment(experiment, namespace=namespace or None).experiment_id
        created = client.create_recurring_run(
            experiment_id,
            name or f"{PIPELINE_NAME} {cron}",
            cron_expression=kfp_cron,
            max_concurrency=1,
            no_catchup=True,
            params=arguments,
            pipeline_package_path=str(path),
            service_account=service_account or None,
        )
    recurring_id = created.recurring_run_id
    return Submitted(
        "schedule", recurring_id, _kfp_url(host, ui_host, f"recurringrun/details/{recurring_id}")
    )
