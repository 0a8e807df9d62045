"""``python -m pipelines submit/schedule``: cron conversion, KFP and Vertex through API stand-ins, errors.

The KFP and Vertex AI APIs are stand-ins on 127.0.0.1 (tests/support/kfp_stand_in.py,
tests/support/vertex_stand_in.py); everything between the CLI and them is the real kfp.Client and
google-cloud-aiplatform.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from components.images import (
    DEFAULT_TASK_IMAGE,
    DEFAULT_WORKER_IMAGE,
    TASK_IMAGE_ENV,
    WORKER_IMAGE_ENV,
    Images,
)
from pipelines.__main__ import main
from pipelines.cron import CronError, parse_cron
from pipelines.dev.ports import unused_port
from tests.support import ROOT
from tests.support.kfp_stand_in import KfpApiStandIn

NETWORK = "projects/123456789/global/networks/gke-vpc"

TASK_IMAGE = "registry.example/kfp-batch-inference-tasks:1.0"
WORKER_IMAGE = "registry.example/kfp-batch-inference:1.0"
IMAGES = Images(TASK_IMAGE, WORKER_IMAGE)
RUN_ARGS = [
    "--images-uri",
    "gs://images/coco",
    "--results-root",
    "gs://results/nightly",
    "--task-image",
    TASK_IMAGE,
    "--image",
    WORKER_IMAGE,
]
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    "text, kfp, vertex",
    [
        ("0 2 * * *", "0 0 2 * * *", "0 2 * * *"),
        ("  30   1 * *   MON-fri ", "0 30 1 * * 1-5", "30 1 * * 1-5"),
        ("*/15 0-6/2 1,15 jan-mar,DEC sun", "0 */15 0-6/2 1,15 1-3,12 0", "*/15 0-6/2 1,15 1-3,12 0"),
        ("@daily", "0 0 0 * * *", "0 0 * * *"),
        ("@weekly", "0 0 0 * * 0", "0 0 * * 0"),
        ("59 23 31 12 6", "0 59 23 31 12 6", "59 23 31 12 6"),
    ],
)
def test_standard_cron_converts_for_each_target(text, kfp, vertex):
    cron = parse_cron(text)
    assert cron.for_kfp() == kfp
    assert cron.for_vertex() == vertex


def test_time_zone_is_for_vertex_only():
    for prefix in ("TZ", "CRON_TZ"):
        cron = parse_cron(f"{prefix}=America/New_York 0 2 * * *")
        assert cron.for_vertex() == "TZ=America/New_York 0 2 * * *"
        with pytest.raises(CronError, match="KFP recurring runs take no time zone.*TZ=America/New_York"):
            cron.for_kfp()


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 2 * * * *", "6 fields given: write standard 5-field cron"),
        ("0 2 * *", r"4 fields given \(expected 5 fields: minute hour"),
        ("", "0 fields given"),
        ("60 2 * * *", "minute 60 is out of range 0-59"),
        ("0 24 * * *", "hour 24 is out of range 0-23"),
        ("0 2 0 * *", "day-of-month 0 is out of range 1-31"),
        ("0 2 * 13 *", "month 13 is out of range 1-12"),
        ("0 2 * * 7", "day-of-week 7 is not read the same way everywhere"),
        ("0 2 ? * *", r"day-of-month field '\?' is not cron syntax"),
        ("0 2 L * *", "day-of-month value 'L' is not a number"),
        ("0 2 * * MON#2", "day-of-week field 'MON#2' is not cron syntax"),
        ("0 2 * FOO *", "month value 'FOO' is not a number or JAN-DEC"),
        ("5-1 * * * *", "minute range '5-1' runs backwards"),
        ("*/0 * * * *", "minute step in '\\*/0' must be at least 1"),
        ("5/10 * * * *", "steps from a single value; write 5-59/10"),
        ("@fortnightly", "unknown shorthand '@fortnightly'"),
        ("TZ=Mars/Olympus 0 2 * * *", "unknown time zone 'Mars/Olympus'"),
        ("TZ=../../etc/passwd 0 2 * * *", "unknown time zone"),
    ],
)
def test_bad_cron_is_one_clear_line(text, message):
    with pytest.raises(CronError, match=message) as err:
        parse_cron(text)
    assert str(err.value).startswith(f"bad cron {text!r}: ") and "\n" not in str(err.value)


def _committed(flavour: str) -> list[dict]:
    """The committed template's documents, with the images a submission here names."""
    text = (ROOT / "compiled" / f"batch_inference_{flavour}.yaml").read_text()
    text = text.replace(DEFAULT_TASK_IMAGE, TASK_IMAGE).replace(DEFAULT_WORKER_IMAGE, WORKER_IMAGE)
    return list(yaml.safe_load_all(text))


def _cli(*args: str, env: dict | None = None, python: list[str] | None = None) -> subprocess.CompletedProcess:
    # The environment carries conftest's guard against google-auth's metadata-server probe, and
    # the images of commands that do not name them.
    full_env = (
        {k: v for k, v in os.environ.items() if k != "BATCH_INFERENCE_DEBUG"}
        | {TASK_IMAGE_ENV: TASK_IMAGE, WORKER_IMAGE_ENV: WORKER_IMAGE}
        | (env or {})
    )
    command = python or [sys.executable, "-m", "pipelines"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=90
    )


def _assert_one_line_error(done: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_submit_to_kfp_creates_the_experiment_and_the_run_and_waits(capsys):
    with KfpApiStandIn() as kfp:
        code = main(
            [
                "submit",
                "--kfp-host",
                kfp.url,
                *RUN_ARGS,
                "--incremental",
                "--batch-size",
                "128",
                "--no-rdma",
                "--experiment",
                "nightly",
                "--run-name",
                "first",
                "--wait",
            ]
        )
        [created] = kfp.calls("POST", "/runs")
        experiments = kfp.calls("POST", "/experiments")
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    run_id = next(iter(kfp.runs))
    assert out == [f"run: {kfp.url}/#/runs/details/{run_id}", "state: SUCCEEDED"]
    assert [e.body["display_name"] for e in experiments] == ["nightly"]
    body = created.body
    assert body["experiment_id"] == next(iter(kfp.experiments)) and body["display_name"] == "first"
    # Only what was given is sent, typed; the compiled defaults apply to the rest.
    assert body["runtime_config"]["parameters"] == {
        "images_uri": "gs://images/coco",
        "results_root": "gs://results/nightly",
        "incremental": True,
        "batch_size": 128,
        "rdma": False,
        "image": WORKER_IMAGE,
    }
    # The Kubeflow flavour, as compiled with the images given, with its kfp-kubernetes platform document.
    committed = _committed("kubeflow")
    assert body["pipeline_spec"]["pipeline_spec"] == committed[0]
    assert body["pipeline_spec"]["platform_spec"] == committed[1]


def test_schedule_on_kfp_sends_six_field_cron(capsys):
    with KfpApiStandIn() as kfp:
        code = main(
            ["schedule", "--kfp-host", kfp.url, *RUN_ARGS, "--incremental", "--cron", "30 1 * * MON-FRI"]
        )
        [recurring] = kfp.recurring_runs.values()
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        f"schedule: {kfp.url}/#/recurringrun/details/{recurring['recurring_run_id']}"
    ]
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 30 1 * * 1-5"
    # One run at a time, and no burst of catch-up runs after a pause.
    assert int(recurring["max_concurrency"]) == 1 and recurring["no_catchup"] is True
    assert recurring["mode"] == "ENABLE" and recurring["display_name"] == "batch-inference 30 1 * * MON-FRI"
    assert recurring["runtime_config"]["parameters"]["incremental"] is True


def test_kfp_that_wants_a_token(capsys):
    with KfpApiStandIn(token="s3cret") as kfp:
        refused = _cli("submit", "--kfp-host", kfp.url, *RUN_ARGS)
        accepted = main(["submit", "--kfp-host", kfp.url, *RUN_ARGS, "--kfp-token", "s3cret"])
        assert len(kfp.runs) == 1
    _assert_one_line_error(
        refused, r"KFP at http://127\.0\.0\.1:\d+ wants credentials \(HTTP 401\): pass --kfp-token"
    )
    assert accepted == 0 and capsys.readouterr().out.startswith(f"run: {kfp.url}/#/runs/details/")


def test_a_run_that_fails_while_awaited_is_an_error(capsys):
    with KfpApiStandIn(final_state="FAILED") as kfp:
        code = main(["submit", "--kfp-host", kfp.url, *RUN_ARGS, "--wait"])
    assert code == 2
    assert (
        capsys.readouterr().err.strip() == f"error: run {next(iter(kfp.runs))} ended FAILED: "
        f"{kfp.url}/#/runs/details/{next(iter(kfp.runs))}"
    )


def test_unreachable_kfp_host_is_one_line():
    done = _cli("submit", "--kfp-host", f"http://127.0.0.1:{unused_port()}", *RUN_ARGS)
    _assert_one_line_error(done, r"cannot reach KFP at http://127\.0\.0\.1:\d+: .*refused")


def test_bad_cron_is_refused_before_anything_is_sent():
    with KfpApiStandIn() as kfp:
        done = _cli("schedule", "--kfp-host", kfp.url, *RUN_ARGS, "--cron", "0 2 * * * *")
        assert kfp.requests == []
    _assert_one_line_error(done, r"bad cron '0 2 \* \* \* \*': 6 fields given")


def test_invalid_parameters_are_refused_before_anything_is_sent():
    with KfpApiStandIn() as kfp:
        missing = _cli("submit", "--kfp-host", kfp.url, "--results-root", "gs://res/x")
        local = _cli(
            "submit", "--kfp-host", kfp.url, "--images-uri", "/data/images", "--results-root", "gs://res/x"
        )
        assert kfp.requests == []
    _assert_one_line_error(missing, "images_uri is empty")
    _assert_one_line_error(local, "images_uri must be a gs:// prefix for the kubernetes backend")


# --- Vertex AI ---------------------------------------------------------------------------

VERTEX_TARGET = ["--vertex", "--project", "my-project", "--location", "us-central1"]
GKE = ["--gke-project", "my-project", "--gke-location", "us-central1", "--gke-cluster", "gpu"]


def test_vertex_without_the_extra_says_how_to_install_it():
    # sys.modules[name] = None makes any import of it fail, as on an install without the extra.
    blocked = [
        sys.executable,
        "-c",
        "import sys; sys.modules['google.cloud.aiplatform'] = None; "
        "from pipelines.__main__ import main; sys.exit(main())",
    ]
    done = _cli("submit", *VERTEX_TARGET, "--pipeline-root", "gs://b/root", *RUN_ARGS, *GKE, python=blocked)
    _assert_one_line_error(
        done, r"Vertex AI support is not installed: pip install 'kfp-batch-inference\[vertex\]'"
    )


def test_vertex_without_credentials_is_one_line(tmp_path):
    pytest.importorskip("google.cloud.aiplatform")
    done = _cli(
        "submit",
        *VERTEX_TARGET,
        "--pipeline-root",
        "gs://b/root",
        *RUN_ARGS,
        *GKE,
        env={"GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": str(tmp_path)},
    )
    _assert_one_line_error(done, "no Google Cloud credentials: run `gcloud auth application-default login`")


def test_vertex_needs_its_target_and_the_gke_cluster():
    done = _cli("submit", "--vertex", *RUN_ARGS, env={"GOOGLE_CLOUD_PROJECT": "", "GOOGLE_CLOUD_REGION": ""})
    _assert_one_line_error(done, "--vertex needs --project, --location, --pipeline-root")
    done = _cli("submit", *VERTEX_TARGET, "--pipeline-root", "gs://b/root", *RUN_ARGS)
    _assert_one_line_error(
        done, "on Vertex AI the launch step runs outside your GKE cluster: set gke_project"
    )


@pytest.fixture
def vertex(gcs):
    """The Vertex stand-in, with aiplatform pointed at it (its pipeline-root bucket is in the GCS emulator)."""
    aiplatform = pytest.importorskip("google.cloud.aiplatform")
    from tests.support.vertex_stand_in import VertexApiStandIn

    with VertexApiStandIn() as stand_in:
        aiplatform.init(api_endpoint=stand_in.url, api_transport="rest")
        try:
            yield stand_in
        finally:
            aiplatform.initializer.global_config._api_endpoint = None
            aiplatform.initializer.global_config._api_transport = None


def test_submit_and_schedule_on_vertex(vertex, gcs):
    from google.auth.credentials import AnonymousCredentials

    from pipelines.vertex import schedule_vertex, submit_vertex

    root = f"gs://{gcs.new_bucket('vertex-root')}/pipeline-root"
    arguments = {
        "images_uri": "gs://images/coco",
        "results_root": "gs://results/nightly",
        "incremental": True,
        "gke_project": "my-project",
        "gke_location": "us-central1",
        "gke_cluster": "gpu",
    }
    run = submit_vertex(
        "my-project",
        "us-central1",
        root,
        arguments,
        run_name="first",
        service_account="runner@my-project.iam.gserviceaccount.com",
        network=NETWORK,
        images=IMAGES,
        wait=True,
        credentials=AnonymousCredentials(),
    )
    schedule = schedule_vertex(
        "my-project",
        "us-central1",
        root,
        arguments,
        "TZ=Europe/Paris 0 2 * * *",
        network=NETWORK,
        images=IMAGES,
        credentials=AnonymousCredentials(),
    )

    [job] = vertex.jobs.values()
    assert (
        run.url
        == (
            "https://console.cloud.google.com/vertex-ai/locations/us-central1/pipelines/runs/"
            f"{run.id}?project=my-project"
        )
        and run.state == "SUCCEEDED"
    )
    assert (
        job["displayName"] == "first" and job["serviceAccount"] == "runner@my-project.iam.gserviceaccount.com"
    )
    assert job["runtimeConfig"]["gcsOutputDirectory"] == root
    assert job["network"] == NETWORK  # peered: the launch step reaches a private GKE endpoint
    assert job["runtimeConfig"]["parameterValues"] == arguments
    [committed] = _committed("vertex")
    assert job["pipelineSpec"] == committed  # the single-document Vertex flavour
    [created] = vertex.schedules.values()
    assert schedule.url.startswith(
        "https://console.cloud.google.com/vertex-ai/locations/us-central1/pipelines/"
        f"schedules/{schedule.id}?project=my-project"
    )
    assert created["cron"] == "TZ=Europe/Paris 0 2 * * *" and int(created["maxConcurrentRunCount"]) == 1
    assert created["createPipelineJobRequest"]["pipelineJob"]["runtimeConfig"]["parameterValues"] == arguments
    assert created["createPipelineJobRequest"]["pipelineJob"]["network"] == NETWORK


def test_a_malformed_vertex_network_is_refused_before_anything_is_sent():
    from pipelines.vertex import submit_vertex

    arguments = {"images_uri": "gs://img/x", "results_root": "gs://res/x"} | {
        "gke_project": "p",
        "gke_location": "l",
        "gke_cluster": "c",
    }
    with pytest.raises(ValueError, match="projects/PROJECT_NUMBER/global/networks/NAME"):
        submit_vertex("p", "us-central1", "gs://root/x", arguments, network="my-vpc", images=IMAGES)
