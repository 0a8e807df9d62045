"""Incremental runs: only new and changed objects are classified; the aggregate covers the union.

The end-to-end test runs the real worker under torchrun against the GCS emulator, twice over a
bucket that grows, changes and shrinks in between, and compares the incremental result with a
full run over the final bucket. The other tests pin the base-run choice on hand-built layouts.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.aggregate.aggregate import aggregate
from components.launch.launch import LaunchRequest, launch
from pipelines.__main__ import main
from pipelines.batch_inference import launch_inputs
from tests.support.helpers import jpeg_bytes
from tests.support.html import parse_html
from tests.support.worker_harness import read_plan, read_results, run_worker
from worker import plan_store
from worker.config import WorkerConfig, parse_args
from worker.fingerprint import OutputGuard, model_revision, prepare_plan
from worker.incremental import latest_base
from worker.results import MANIFEST, MARKER, PLAN_FILE, completed_runs, read_manifest, read_run_record
from worker.storage import join, open_storage, read_text, write_text

pytestmark = pytest.mark.timeout(240)

CORRUPT = "data/corrupt.jpg"


def _put(client, bucket: str, name: str, data: bytes) -> int:
    blob = client.bucket(bucket).blob(name)
    blob.upload_from_string(data, content_type="image/jpeg")
    return blob.generation


def _aggregate(results_uri: str, tmp_path: Path, name: str) -> tuple[dict, pd.DataFrame]:
    csv_path = tmp_path / name / "results.csv"
    report = aggregate(
        results_uri,
        csv_path=str(csv_path),
        parquet_path=str(tmp_path / name / "r.parquet"),
        html_path=str(tmp_path / name / "report.html"),
    )
    return report.metrics, pd.read_csv(csv_path, keep_default_na=False)


def _worker(input_uri: str, output: str, model: Path, *flags: str, nproc: int = 1) -> None:
    run_worker(
        input_uri,
        output,
        str(model),
        nproc,
        "--shard-size",
        "3",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-compose",
        *flags,
    )


@pytest.mark.slow
def test_second_run_classifies_only_the_difference_and_matches_a_full_run(
    gcs, tiny_model, tmp_path, capsys, monkeypatch
):
    # Joins and sorts of the planning and the aggregate a few rows at a time, as at 100 M images.
    monkeypatch.setenv("BATCH_INFERENCE_PARTITION_ROWS", "3")
    monkeypatch.setattr(plan_store, "PARTITION_ROWS", 3)
    bucket = gcs.new_bucket("incremental")
    images = f"gs://{bucket}/data"
    first = {f"data/d{i % 2}/img_{i:03d}.jpg": jpeg_bytes(i) for i in range(10)}
    for name, data in first.items():
        _put(gcs.client, bucket, name, data)
    _put(gcs.client, bucket, CORRUPT, b"\xff\xd8\xff\xe0 not a jpeg")

    run_a = f"gs://{bucket}/runs/a"
    _worker(images, run_a, tiny_model, "--incremental")
    metrics_a, table_a = _aggregate(run_a, tmp_path, "a")
    assert metrics_a["classified"] == 10 and metrics_a["errors"] == 1 and metrics_a["reused"] == 0

    # Between the runs: three objects added, two overwritten (new generation), two deleted.
    added = [f"data/d2/img_{i:03d}.jpg" for i in range(10, 13)]
    overwritten = ["data/d1/img_001.jpg", "data/d0/img_002.jpg"]
    deleted = ["data/d1/img_003.jpg", "data/d0/img_004.jpg"]
    for i, name in enumerate(added):
        _put(gcs.client, bucket, name, jpeg_bytes(100 + i))
    for i, name in enumerate(overwritten):
        before = gcs.client.bucket(bucket).get_blob(name).generation
        assert _put(gcs.client, bucket, name, jpeg_bytes(200 + i, size=(64, 48))) != before
    for name in deleted:
        gcs.client.bucket(bucket).blob(name).delete()

    run_b = f"gs://{bucket}/runs/b"
    _worker(images, run_b, tiny_model, "--incremental", nproc=2)
    planned_b, parts_b, errors_b = read_results(run_b)
    uri = f"gs://{bucket}/".__add__
    # Exactly the difference: new and overwritten objects, plus the one the first run could not
    # classify (an error is retried, never carried over).
    assert planned_b == sorted(map(uri, added + overwritten + [CORRUPT]))
    assert sorted(r["uri"] for r in parts_b) == sorted(map(uri, added + overwritten))
    assert [r["uri"] for r in errors_b] == [uri(CORRUPT)]
    run_info = json.loads(read_text(join(run_b, "run.json")))
    assert (run_info["base"], run_info["listed"], run_info["reused"]) == (run_a, 12, 6)
    assert (run_info["changed"], run_info["deleted"]) == (2, 2)

    metrics_b, table_b = _aggregate(run_b, tmp_path, "b")
    report = " ".join(parse_html(tmp_path / "b" / "report.html").text)
    assert "Incremental run" in report and run_a in report
    final = sorted(set(first) - set(deleted) | set(added))
    assert table_b["uri"].tolist() == sorted(map(uri, final))
    assert metrics_b["images"] == 6 and metrics_b["classified"] == 5 and metrics_b["errors"] == 1
    assert (metrics_b["rows"], metrics_b["reused"], metrics_b["changed"], metrics_b["deleted"]) == (
        11,
        6,
        2,
        2,
    )
    # The union is what a full run over the final bucket gives, row for row.
    run_full = f"gs://{bucket}/full/run"
    _worker(images, run_full, tiny_model)
    _, table_full = _aggregate(run_full, tmp_path, "full")
    columns = ["uri", "image_id", "classification", "label_index"]
    pd.testing.assert_frame_equal(table_b[columns], table_full[columns])
    assert table_b["score"].to_numpy() == pytest.approx(table_full["score"].to_numpy(), abs=1e-4)
    # Unchanged images kept the first run's rows; the manifest records each row's current generation.
    unchanged = sorted(map(uri, set(first) - set(deleted) - set(overwritten)))
    pd.testing.assert_frame_equal(
        table_b.set_index("uri").loc[unchanged], table_a.set_index("uri").loc[unchanged]
    )
    manifest = read_manifest(join(run_b, MANIFEST)).set_index("uri")["generation"]
    live = {uri(b.name): b.generation for b in gcs.client.list_blobs(bucket, prefix="data/")}
    assert manifest.to_dict() == {u: g for u, g in live.items() if u != uri(CORRUPT)}

    # `python -m pipelines latest` finds run b (the full run is under another root) and fetches its table.
    assert (
        main(["latest", "--results-root", f"gs://{bucket}/runs", "--out", str(tmp_path / "latest.csv")]) == 0
    )
    printed = capsys.readouterr().out
    assert f"run:      {run_b}\n" in printed and "rows:     11 (5 classified in this run, 6 reused" in printed
    assert pd.read_csv(tmp_path / "latest.csv")["uri"].tolist() == table_b["uri"].tolist()


def _complete_run(
    root: Path,
    name: str,
    *,
    at: str,
    model: str = "m",
    input_uri: str = "gs://b/images",
    manifest: bool = True,
    incremental: bool = True,
    extra: dict | None = None,
) -> str:
    """A run folder with only the marker the base-run search reads (``extra``: more of its record)."""
    results = str(root / name)
    marker = {
        "aggregated_at": at,
        "run": {"input": input_uri, "model": model, "incremental": incremental, **(extra or {})},
        "metrics": {},
    }
    if manifest:
        marker["manifest"] = MANIFEST
    write_text(join(results, MARKER), json.dumps(marker))
    return results


def test_base_is_the_latest_complete_run_of_the_same_input_and_model(tmp_path):
    root = tmp_path / "runs"
    older = _complete_run(root, "r1", at="2026-01-01T02:00:00.000001+00:00")
    newest = _complete_run(root, "r2", at="2026-01-02T02:00:00.000001+00:00")
    _complete_run(root, "r3", at="2026-01-03T02:00:00+00:00", model="another-model")
    _complete_run(root, "r4", at="2026-01-04T02:00:00+00:00", input_uri="gs://b/other")
    _complete_run(root, "r5", at="2026-01-05T02:00:00+00:00", manifest=False)  # aggregated before manifests
    write_text(join(str(root), "r6", PLAN_FILE), "")  # started, never aggregated
    _complete_run(root / "r7", "nested", at="2026-01-07T02:00:00+00:00")  # not a sibling
    _complete_run(root, "r9", at="2026-01-09T02:00:00+00:00", incremental=False)  # rows without generations

    assert [r.results_uri for r in completed_runs(str(root))][:2] == [older, newest]
    assert latest_base(str(root / "r8"), "gs://b/images", "m").results_uri == newest
    assert latest_base(str(root / "r2"), "gs://b/images", "m").results_uri == older  # never itself
    assert latest_base(str(root / "r8"), "gs://b/images", "new-model") is None
    assert latest_base(str(tmp_path / "no-such-root" / "r1"), "gs://b/images", "m") is None


def test_incremental_needs_generations():
    with pytest.raises(ValueError, match="--incremental needs a gs:// --input"):
        WorkerConfig(input="/data/images", output="/tmp/out", model="m", incremental=True)
    args = WorkerConfig(input="gs://bkt/i", output="gs://bkt/r1", model="m", incremental=True).to_args()
    assert "--incremental" in args


def _launcher_night(
    gcs, tiny_model: Path, bucket: str, base_revision: str, tmp_path: Path
) -> tuple[dict, str, list[str]]:
    """Three objects and a complete earlier run of them (its base record made with
    ``base_revision`` of ``tiny_model``): the launch values of the next night's run, the base, the URIs.
    The model is a copy of ``tiny_model`` in GCS, as a job's pods need it; it is fetched into ``tmp_path``.
    """
    model = f"gs://{bucket}/model"
    for path in tiny_model.rglob("*"):
        if path.is_file():
            blob = gcs.client.bucket(bucket).blob(f"model/{path.relative_to(tiny_model).as_posix()}")
            blob.upload_from_filename(str(path))
    names = [f"data/img_{i}.jpg" for i in range(3)]
    generations = [_put(gcs.client, bucket, name, jpeg_bytes(i)) for i, name in enumerate(names)]
    uris = [f"gs://{bucket}/{name}" for name in names]
    base = f"gs://{bucket}/runs/night-1"
    manifest = pd.DataFrame(
        {
            "image_id": [f"img_{i}" for i in range(3)],
            "classification": ["cat", "dog", "cat"],
            "label_index": [3, 5, 3],
            "score": [0.9, 0.8, 0.7],
            "uri": uris,
            "generation": pd.array(generations, dtype="Int64"),
        }
    )
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    open_storage(base).write(join(base, MANIFEST), buf.getvalue())
    record = {
        "input": f"gs://{bucket}/data",
        "model": model,
        "incremental": True,
        "task": "classification",
        "model_revision": base_revision,
    }
    write_text(
        join(base, MARKER),
        json.dumps(
            {"aggregated_at": "2026-01-01T02:00:00.000001+00:00", "manifest": MANIFEST, "run": record}
        ),
    )
    values = {name: spec.default for name, spec in launch_inputs().items()}
    values.update(
        images_uri=f"gs://{bucket}/data",
        results_root=f"gs://{bucket}/runs",
        run_id="night-2",
        incremental=True,
        backend="kubernetes",
        model=model,
        image="registry.example/kfp-batch-inference:1.0",
        extra_worker_args=f"--model-cache {tmp_path / 'model-cache'}",
    )
    return values, base, uris


def test_a_run_with_nothing_new_plans_in_the_launcher_and_starts_no_job(gcs, tiny_model, tmp_path):
    bucket = gcs.new_bucket("unchanged")
    values, base, uris = _launcher_night(gcs, tiny_model, bucket, model_revision(str(tiny_model)), tmp_path)
    lines: list[str] = []

    # No Kubernetes API is given or reachable here: reaching for one would fail the call.
    result = launch(LaunchRequest(**values), log=lines.append)

    assert (result.job_name, result.nodes, result.world_size) == ("", 0, 0)
    assert lines == [
        f"incremental plan: 0 of 3 images under gs://{bucket}/data are new or changed since {base}"
    ]
    assert read_results(result.results_uri) == ([], [], [])
    metrics, table = _aggregate(result.results_uri, tmp_path, "night-2")
    assert (metrics["images"], metrics["rows"], metrics["reused"]) == (0, 3, 3)
    assert table["classification"].tolist() == ["cat", "dog", "cat"] and table["uri"].tolist() == uris


def test_the_launcher_reuses_no_rows_of_another_model_revision(gcs, tiny_model, tmp_path):
    """The same model path with other files (a fine-tune written over it): every image is planned
    again, so the job runs rather than carrying the old model's labels over.
    """
    bucket = gcs.new_bucket("retrained")
    values, base, uris = _launcher_night(gcs, tiny_model, bucket, "sha256:" + "0" * 64, tmp_path)

    cfg = parse_args(LaunchRequest(**values).worker_args())
    plan = prepare_plan(cfg)

    assert sorted(o.uri for o in read_plan(cfg.output)) == uris and plan.images == len(uris)
    assert plan.record["base"] is None and plan.record["reused"] == 0


def test_base_must_agree_on_the_model_revision_and_the_labels_settings(tmp_path):
    root = tmp_path / "runs"
    old = _complete_run(root, "r1", at="2026-01-01T02:00:00+00:00", extra={"model_revision": "hub:a"})
    _complete_run(root, "r2", at="2026-01-02T02:00:00+00:00", extra={"model_revision": "hub:b"})
    _complete_run(
        root, "r3", at="2026-01-03T02:00:00+00:00", extra={"model_revision": "hub:a", "decode": "cpu"}
    )
    unrecorded = _complete_run(root, "r4", at="2026-01-04T02:00:00+00:00")  # aggregated before revisions

    def current() -> dict:
        return {"model_revision": "hub:a", "decode": "auto", "shard_size": 7}

    assert latest_base(str(root / "r9"), "gs://b/images", "m", current=current).results_uri == unrecorded
    open_storage(str(root)).delete(join(unrecorded, MARKER))
    # r3 decoded otherwise and r2 ran another revision; r1's rows are this run's labels (shard size aside).
    assert latest_base(str(root / "r9"), "gs://b/images", "m", current=current).results_uri == old
    assert (
        latest_base(str(root / "r9"), "gs://b/images", "m", current=lambda: {"model_revision": "hub:c"})
        is None
    )


def test_a_plan_made_without_the_revision_is_made_again_when_its_base_ran_another(gcs, tiny_model, tmp_path):
    bucket = gcs.new_bucket("replan")
    values, base, uris = _launcher_night(gcs, tiny_model, bucket, "sha256:" + "0" * 64, tmp_path)
    cfg = parse_args(LaunchRequest(**values).worker_args())
    # As a launcher that knew no revision planned it: on the base, with nothing to classify.
    early = OutputGuard(cfg, None).plan()
    assert early.record["base"] == base and early.images == 0

    guard = OutputGuard(cfg, "cpu")  # the job's rank 0, with the model fetched
    plan = guard.plan(lambda: model_revision(str(tiny_model)))
    guard.seal(plan, model_revision(str(tiny_model)))

    assert sorted(o.uri for o in read_plan(cfg.output)) == uris and plan.record["base"] is None
    assert read_run_record(cfg.output)["model_revision"] == model_revision(str(tiny_model))


@pytest.mark.slow
def test_an_incremental_embedding_run_carries_the_vectors_over(gcs, models, tmp_path):
    model = models("dinov2")
    bucket = gcs.new_bucket("incremental-embedding")
    images = f"gs://{bucket}/data"
    for i in range(6):
        _put(gcs.client, bucket, f"data/img_{i:03d}.jpg", jpeg_bytes(i))
    _worker(images, f"gs://{bucket}/runs/a", model, "--incremental", "--task", "embedding")
    _aggregate(f"gs://{bucket}/runs/a", tmp_path, "a")
    _put(gcs.client, bucket, "data/img_100.jpg", jpeg_bytes(100))
    _put(gcs.client, bucket, "data/img_001.jpg", jpeg_bytes(101, size=(64, 48)))

    _worker(images, f"gs://{bucket}/runs/b", model, "--incremental", "--task", "embedding")
    metrics, _ = _aggregate(f"gs://{bucket}/runs/b", tmp_path, "b")
    assert (metrics["classified"], metrics["reused"], metrics["changed"]) == (2, 5, 1)
    _worker(images, f"gs://{bucket}/full", model, "--task", "embedding")
    _aggregate(f"gs://{bucket}/full", tmp_path, "full")

    incremental, full = (pd.read_parquet(tmp_path / name / "r.parquet") for name in ("b", "full"))
    assert incremental["uri"].tolist() == full["uri"].tolist() and len(full) == 7
    for a, b in zip(incremental["embedding"], full["embedding"], strict=True):
        assert np.allclose(a, b, atol=1e-5)
