"""The whole pipeline through kfp.local (real subprocess components, real torchrun), and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.dev.local_run import EMULATOR_IMAGES_URI, EMULATOR_RESULTS_ROOT, run_pipeline_locally
from pipelines.dev.sample_images import CORRUPT_NAME, make_sample_images
from tests.support import ROOT

COMPILED = ROOT / "compiled"

N_IMAGES = 24


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BATCH_INFERENCE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args],
        cwd=ROOT,
        env=env,
        check=check,
        capture_output=True,
        text=True,
    )


def _assert_one_row_per_image(
    csv_path: str, parquet_path: str, metrics: dict, image_uris: set[str], corrupt_uri: str
) -> None:
    table = pd.read_csv(csv_path)
    # Every image that decoded has exactly one row; the corrupt one is an error, not a row.
    assert table["uri"].is_unique
    assert set(table["uri"]) == image_uris - {corrupt_uri}
    assert metrics["images"] == len(image_uris) == len(table) + metrics["errors"]
    assert metrics["classified"] == len(table)
    assert metrics["errors"] == 1
    assert metrics["missing"] == metrics["duplicated"] == 0
    assert metrics["distinct_classes"] == table["classification"].nunique()
    assert metrics["ranks"] == 2
    assert pd.read_parquet(parquet_path).equals(table.astype(pd.read_parquet(parquet_path).dtypes))


def _assert_errors_table(errors_csv: str, corrupt_uri: str) -> None:
    errors = pd.read_csv(errors_csv, keep_default_na=False)
    assert errors["uri"].tolist() == [corrupt_uri] and errors["reason"].iloc[0]


@pytest.mark.slow
def test_compiled_kubeflow_pipeline_through_the_gcs_emulator(gcs, tiny_model, tmp_path):
    # The committed Kubeflow YAML, as a server would run it: under the launcher's artifact rules.
    sample = make_sample_images(tmp_path / "images", N_IMAGES)
    bucket = gcs.new_bucket("pipeline")
    images_uri = f"gs://{bucket}/images"

    run = run_pipeline_locally(
        package=COMPILED / "batch_inference_kubeflow.yaml",
        pipeline_root=tmp_path / "root",
        source=str(sample.root),
        images_uri=images_uri,
        results_root=f"gs://{bucket}/results",
        model=str(tiny_model),
        local_nproc=2,
        batch_size=4,
        shard_size=5,
        device="cpu",
        price_per_gpu_hour=3.0,
    )

    uploaded = {f"gs://{bucket}/{name}" for name in gcs.object_names(bucket, "images/")}
    expected = {f"{images_uri}/{p.relative_to(sample.root).as_posix()}" for p in sample.images}
    assert uploaded == expected
    assert run.results_uri.startswith(f"gs://{bucket}/results/")
    _assert_one_row_per_image(
        run.results_csv, run.results_parquet, run.metrics, expected, f"{images_uri}/{CORRUPT_NAME}"
    )
    _assert_errors_table(run.errors_csv, f"{images_uri}/{CORRUPT_NAME}")
    assert "<html" in Path(run.report_html).read_text().lower()
    assert gcs.object_names(bucket, run.results_uri.split("/", 3)[3] + "/plan/index.json")
    assert (run.job["backend"], run.job["images_uri"], run.job["results_uri"]) == (
        "local",
        images_uri,
        run.results_uri,
    )
    assert run.job["job_seconds"] > 0 and run.metrics["job_seconds"] == run.job["job_seconds"]
    # Locally the job holds its devices for torchrun's run, within the launch step; no queue.
    assert 0 < run.job["held_seconds"] <= run.job["job_seconds"] and run.job["queue_seconds"] is None
    assert run.metrics["held_seconds"] == run.job["held_seconds"] and "queue_seconds" not in run.metrics
    # A CPU run holds no GPU: no GPU-hours and no cost, whatever the price.
    assert run.metrics["gpus"] == 0 and "gpu_hours" not in run.metrics and "cost" not in run.metrics


@pytest.mark.slow
def test_compiled_vertex_pipeline_on_local_paths(tiny_model, tmp_path):
    sample = make_sample_images(tmp_path / "images", 6)

    run = run_pipeline_locally(
        package=COMPILED / "batch_inference_vertex.yaml",
        pipeline_root=tmp_path / "root",
        images_uri=str(sample.root),
        results_root=str(tmp_path / "results"),
        model=str(tiny_model),
        local_nproc=1,
        shard_size=4,
        device="cpu",
    )

    assert run.metrics["images"] == 6 and run.metrics["missing"] == 0
    _assert_errors_table(run.errors_csv, str(sample.root / CORRUPT_NAME))


@pytest.mark.slow
def test_cli_makes_a_model_and_runs_the_demo_leaving_a_run_folder(tmp_path):
    # What scripts/demo.sh runs: the GCS emulator mode, whose raw results die with the emulator.
    model = tmp_path / "tiny"
    made = _cli("make-model", "--out", str(model), "--tiny")
    assert "RANDOM" in made.stdout
    labels = json.loads((model / "config.json").read_text())["id2label"]
    assert set(labels.values()) == {f"random_class_{i}" for i in range(10)}

    done = _cli(
        "run",
        "--local",
        "--model",
        str(model),
        "--workdir",
        str(tmp_path / "work"),
        "--num-images",
        "12",
        "--local-nproc",
        "2",
        "--device",
        "cpu",
    )
    lines = done.stdout.splitlines()
    printed = {
        key.strip(): value.strip()
        for key, value in (line.split(": ", 1) for line in lines if line.startswith("  ") and ": " in line)
    }
    metrics = {k: float(v) for k, v in (kv.split("=") for kv in printed["metrics"].split())}
    images = tmp_path / "work" / "sample-images-12"
    uris = {
        f"{EMULATOR_IMAGES_URI}/{p.relative_to(images).as_posix()}" for p in images.rglob("*") if p.is_file()
    }
    corrupt = f"{EMULATOR_IMAGES_URI}/{CORRUPT_NAME}"
    # The run folder outlives the emulator, and the last line says what to open.
    run_folder = Path(lines[-1].removeprefix("open ")).parent
    assert (
        lines[-1] == f"open {run_folder / 'report.html'}" and run_folder.parent == tmp_path / "work" / "runs"
    )
    assert printed["results CSV"] == str(run_folder / "results.csv")
    assert printed["results Parquet"] == str(run_folder / "results.parquet")
    assert printed["errors CSV"] == str(run_folder / "errors.csv")
    _assert_one_row_per_image(
        str(run_folder / "results.csv"), str(run_folder / "results.parquet"), metrics, uris, corrupt
    )
    _assert_errors_table(str(run_folder / "errors.csv"), corrupt)
    report = (run_folder / "report.html").read_text()
    assert report.lstrip().lower().startswith("<!doctype html>") and "</html>" in report.lower()
    record = json.loads((run_folder / "run.json").read_text())
    assert record["input"] == EMULATOR_IMAGES_URI and record["model"] == str(model)
    ranks = sorted(json.loads(p.read_text())["rank"] for p in (run_folder / "summary").iterdir())
    assert ranks == [0, 1]
    assert printed["raw results"].startswith(EMULATOR_RESULTS_ROOT) and "gone" in printed["raw results"]


def test_render_job_prints_a_pytorchjob():
    done = _cli(
        "render-job",
        "--images-uri",
        "gs://bkt/images",
        "--results-root",
        "gs://bkt/results",
        "--nodes",
        "3",
        "--gpus-per-node",
        "4",
        "--no-rdma",
        "--run-id",
        "run-123",
        "--image",
        "registry.example/kfp-batch-inference:1.0",
    )
    job = yaml.safe_load(done.stdout)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["spec"]["nprocPerNode"] == "4"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    command = " ".join(container["command"])
    assert "--input gs://bkt/images --output gs://bkt/results/run-123" in command
    assert "set_nccl_env.sh" not in command


def test_user_errors_are_one_line():
    for args in (
        ["render-job"],
        ["render-job", "--images-uri", "/local/images", "--results-root", "gs://bkt/r"],
        ["run", "--local", "--source", "/no/such/folder", "--results-root", "/tmp/x"],
    ):
        done = _cli(*args, check=False)
        assert done.returncode == 2, args
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["--results-root", "s3://bucket/runs"], "results_root"),
        (["--images-uri", "gs://Not_A_Bucket/images"], "images_uri"),
        (["--batch-size", "0"], "batch_size"),
        (["--shard-size", "-4"], "shard_size"),
        # A folder without a single image: zero images planned is an error (the run is not incremental).
        (["--source", "{tmp}/empty", "--results-root", "{tmp}/results"], "holds no images"),
    ],
)
def test_a_bad_parameter_fails_before_any_upload_naming_it(tiny_model, tmp_path, args, named):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image\n")
    args = [arg.format(tmp=tmp_path) for arg in args]
    done = _cli(
        "run",
        "--local",
        "--model",
        str(tiny_model),
        "--workdir",
        str(tmp_path),
        "--num-images",
        "2",
        *args,
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert named in done.stderr
    assert "images:" not in done.stdout  # the run never started: nothing was uploaded
