"""aggregate on hand-built result layouts, local and on the GCS emulator."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from components.aggregate.aggregate import IncompleteResultsError, aggregate
from components.launch.job_record import JobRecord
from tests.support.html import parse_html
from worker import plan_store
from worker.plan_store import write_table
from worker.results import (
    FINGERPRINT_KEYS,
    MANIFEST,
    MARKER,
    PLAN_DIR,
    RUN_FILE,
    part_name,
    plan_digest,
    read_manifest,
    sealed,
)
from worker.storage import ObjectInfo, join, open_storage, read_text, write_text

COLUMNS = ["image_id", "classification", "label_index", "score", "uri"]
# One label carries markup and quotes: the report must show it as text, never as tags.
CLASSES = ["tabby cat", "golden retriever", '<b>odd & "quoted"</b>', "NA"]


def _uri(i: int) -> str:
    return f"gs://images/coco/d{i % 3}/{i:012d}.jpg"


def _label(i: int) -> int:
    # Skewed on purpose (0,0,0,1,1,2,3,...) so the top-class order is well defined.
    return [0, 0, 0, 1, 1, 2, 3][i % 7]


def _csv(header: list[str], rows: list[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_layout(
    out: str,
    planned: list[int],
    parts: dict[int, list[int]],
    errors: dict[int, list[int]] | None = None,
    summaries: list[dict] | None = None,
    extra_part_uris: dict[int, list[str]] | None = None,
) -> str:
    """Write OUTPUT/{run.json, plan/, parts/, errors/, summary/} in the worker's documented
    format; returns the run's fingerprint.
    """
    plan = [ObjectInfo(_uri(i), 1000 + i, None if i % 2 else 1712345678901234 + i) for i in planned]
    fingerprint = write_record(out, write_table(join(out, PLAN_DIR), [plan], shard_size=4))
    for shard, images in parts.items():
        rows = [
            (f"{i:012d}", CLASSES[_label(i)], _label(i), round(0.5 + i / 1000, 3), _uri(i)) for i in images
        ]
        rows += [
            (u.rsplit("/", 1)[1].split(".")[0], "tabby cat", 0, 0.9, u)
            for u in (extra_part_uris or {}).get(shard, [])
        ]
        write_text(join(out, "parts", part_name(shard, fingerprint)), _csv(COLUMNS, rows))
    for shard, images in (errors or {}).items():
        rows = [(_uri(i), f"decode failed: <corrupt> #{i}") for i in images]
        write_text(join(out, "errors", part_name(shard, fingerprint)), _csv(["uri", "reason"], rows))
    for s in summaries or []:
        write_text(join(out, "summary", f"rank-{s['rank']}.json"), json.dumps(s))
    return fingerprint


def write_record(out: str, plan_index: bytes) -> str:
    """Write OUTPUT/run.json as a worker seals it for the plan with ``plan_index``; returns the fingerprint."""
    record = sealed(
        {key: None for key in FINGERPRINT_KEYS}
        | {"input": "gs://images/coco", "model": "tiny", "incremental": False}
        | {"plan_sha256": plan_digest(plan_index)}
    )
    write_text(join(out, RUN_FILE), json.dumps(record))
    return record["fingerprint"]


def _summary(rank: int, images: int, seconds: float, device: str = "cuda") -> dict:
    return {
        "rank": rank,
        "world_size": 2,
        "images": images,
        "errors": 0,
        "seconds": seconds,
        "images_per_second": images / seconds,
        "device": device,
        "shards": 2,
    }


def _outputs(tmp_path: Path) -> dict[str, str]:
    return {
        k: str(tmp_path / "artifacts" / k / name)
        for k, name in (
            ("csv_path", "results.csv"),
            ("parquet_path", "results.parquet"),
            ("html_path", "report.html"),
            ("errors_path", "errors.csv"),
        )
    }


@pytest.fixture(params=[None, 2], ids=["one-partition", "partitions-of-2"])
def results_root(any_prefix, request, monkeypatch) -> str:
    """A results prefix; the tables checked and joined whole, or a hash partition of 2 rows at a
    time (``worker.plan_store.each_partition``): the outcome must not depend on it.
    """
    if request.param:
        monkeypatch.setattr(plan_store, "PARTITION_ROWS", request.param)
    return any_prefix


def test_complete_results(results_root, tmp_path):
    planned = list(range(12))
    # Shard 2's only images all failed: its part is header-only, its errors hold them.
    write_layout(
        results_root,
        planned,
        parts={0: [0, 1, 2, 3, 4], 1: [5, 6, 8, 9], 2: []},
        errors={1: [7], 2: [10, 11]},
        summaries=[_summary(0, 6, 4.0), _summary(1, 6, 3.0, device="cpu")],
    )
    out = _outputs(tmp_path)

    report = aggregate(results_root, **out)

    assert report.complete
    assert report.metrics == {
        "images": 12,
        "classified": 9,
        "errors": 3,
        "missing": 0,
        "duplicated": 0,
        "unexpected": 0,
        "distinct_classes": 4,
        "images_per_second": 12 / 4.0,
        "wall_seconds": 4.0,
        "ranks": 2,
        # One rank ran on a GPU; without a job record the slowest rank's time stands in.
        "gpus": 1,
        "job_seconds": 4.0,
        "held_seconds": 4.0,
        "gpu_hours": 4.0 / 3600,
        "rows": 9,
        "reused": 0,
        "changed": 0,
        "deleted": 0,
    }
    classified = [0, 1, 2, 3, 4, 5, 6, 8, 9]
    # Labels of the classified images: class 0 x5 (0,1,2,8,9), class 1 x2 (3,4), then 5 and 6 once each.
    assert report.top_classes == [
        ("tabby cat", 5),
        ("golden retriever", 2),
        ('<b>odd & "quoted"</b>', 1),
        ("NA", 1),
    ]
    assert report.errors_sample == sorted((_uri(i), f"decode failed: <corrupt> #{i}") for i in (7, 10, 11))

    table = pd.read_csv(out["csv_path"], keep_default_na=False)
    assert list(table.columns) == COLUMNS
    assert table["uri"].tolist() == sorted(_uri(i) for i in classified)
    assert "NA" in table["classification"].tolist()  # a label, not a missing value
    parquet = pd.read_parquet(out["parquet_path"])
    assert list(parquet.columns) == COLUMNS and len(parquet) == 9
    assert str(parquet["label_index"].dtype) == "int64"
    assert parquet["uri"].tolist() == table["uri"].tolist()

    errors = pd.read_csv(out["errors_path"], keep_default_na=False)
    assert list(errors.columns) == ["uri", "reason"]
    assert list(errors.itertuples(index=False, name=None)) == report.errors_sample

    marker = json.loads(read_text(join(results_root, MARKER)))
    assert marker["metrics"] == report.metrics and marker["parts"] == 3
    # The manifest: the same rows, with the generation each image was read at (none for odd i).
    assert marker["manifest"] == MANIFEST
    manifest = read_manifest(join(results_root, MANIFEST))
    assert manifest["uri"].tolist() == table["uri"].tolist()
    assert [None if pd.isna(g) else int(g) for g in manifest["generation"]] == [
        None if i % 2 else 1712345678901234 + i for i in sorted(classified, key=_uri)
    ]
    schema = pq.read_schema(io.BytesIO(open_storage(results_root).read(join(results_root, MANIFEST))))
    assert schema.field("generation").type == "int64"  # a nullable integer, never a float

    page = parse_html(Path(out["html_path"]))
    text = " ".join(page.text)
    assert "b" not in page.tags  # the <b> label was escaped, not rendered
    for name in CLASSES:
        assert name in text
    for i in (7, 10, 11):
        assert _uri(i) in text and f"<corrupt> #{i}" in text
    assert "Complete" in text


@pytest.mark.parametrize(
    "case, expected",
    [
        pytest.param(case, expected, id=case)
        for case, expected in [
            (
                "missing",
                r"1 missing, 0 duplicated, 0 unexpected of 6 planned images; "
                r"first missing: gs://images/coco/d1/000000000004\.jpg",
            ),
            (
                "duplicate_across_parts",
                r"0 missing, 1 duplicated, 0 unexpected .*"
                r"first duplicated: gs://images/coco/d0/000000000003\.jpg",
            ),
            (
                "duplicate_part_and_error",
                r"0 missing, 1 duplicated, .*first duplicated: gs://images/coco/d2/000000000005\.jpg",
            ),
            (
                "unexpected",
                r"0 missing, 0 duplicated, 1 unexpected .*first unexpected: gs://images/coco/stray\.jpg",
            ),
        ]
    ],
)
def test_incomplete_results_raise_after_writing_the_report(results_root, tmp_path, case, expected):
    parts = {0: [0, 1, 2], 1: [3, 4, 5]}
    errors, extra = None, None
    if case == "missing":
        parts[1] = [3, 5]
    elif case == "duplicate_across_parts":
        parts[0] = [0, 1, 2, 3]
    elif case == "duplicate_part_and_error":
        errors = {1: [5]}
    else:
        extra = {1: ["gs://images/coco/stray.jpg"]}
    write_layout(
        results_root,
        list(range(6)),
        parts,
        errors=errors,
        extra_part_uris=extra,
        summaries=[_summary(0, 6, 2.0, device="cpu")],
    )
    out = _outputs(tmp_path)

    with pytest.raises(IncompleteResultsError, match=expected) as err:
        aggregate(results_root, **out)

    assert not err.value.report.complete
    page = parse_html(Path(out["html_path"]))
    text = " ".join(page.text)
    assert "Incomplete" in text
    offending = (
        err.value.report.missing_sample
        + err.value.report.duplicated_sample
        + err.value.report.unexpected_sample
    )
    assert len(offending) == 1 and offending[0] in text
    # Nothing that could pass for a finished result.
    assert not Path(out["csv_path"]).exists() and not Path(out["parquet_path"]).exists()
    assert not open_storage(results_root).exists(join(results_root, MARKER))


def test_problems_in_many_partitions_are_counted_and_sampled_in_uri_order(results_root, tmp_path):
    write_layout(
        results_root,
        list(range(12)),
        {0: [0, 2, 4], 1: [6, 7, 8, 9, 10, 11, 11]},
        extra_part_uris={0: [f"gs://images/stray/{i}.jpg" for i in range(4)]},
        summaries=[_summary(0, 12, 2.0, device="cpu")],
    )

    with pytest.raises(IncompleteResultsError) as err:
        aggregate(results_root, **_outputs(tmp_path))

    report = err.value.report
    assert (report.metrics["missing"], report.metrics["duplicated"], report.metrics["unexpected"]) == (
        3,
        1,
        4,
    )
    assert report.missing_sample == sorted(_uri(i) for i in (1, 3, 5))
    assert report.unexpected_sample == [f"gs://images/stray/{i}.jpg" for i in range(4)]
    assert report.duplicated_sample == [_uri(11)]


def test_error_file_of_uncommitted_shard_does_not_count(tmp_path):
    """Errors are written before their part; without the part the shard never committed."""
    root = str(tmp_path / "results")
    write_layout(root, [0, 1, 2], parts={0: [0, 1]}, errors={1: [2]})

    with pytest.raises(IncompleteResultsError, match=r"1 missing.*000000000002\.jpg"):
        aggregate(root, **_outputs(tmp_path))


def test_empty_plan(results_root, tmp_path):
    write_layout(results_root, [], parts={})
    out = _outputs(tmp_path)

    report = aggregate(results_root, **out)

    assert report.complete and report.top_classes == [] and report.errors_sample == []
    assert report.metrics["images"] == report.metrics["classified"] == report.metrics["ranks"] == 0
    assert report.metrics["images_per_second"] == 0.0
    assert Path(out["csv_path"]).read_text().strip() == ",".join(COLUMNS)
    assert list(pd.read_parquet(out["parquet_path"]).columns) == COLUMNS
    assert len(pd.read_parquet(out["parquet_path"])) == 0
    parse_html(Path(out["html_path"]))
    assert open_storage(results_root).exists(join(results_root, MARKER))


def test_part_with_wrong_columns_is_named(tmp_path):
    root = str(tmp_path / "results")
    fingerprint = write_layout(root, [0], parts={})
    write_text(join(root, "parts", part_name(0, fingerprint)), "image_id,classification\nx,cat\n")

    with pytest.raises(ValueError, match=part_name(0, fingerprint)):
        aggregate(root, **_outputs(tmp_path))


def test_missing_plan_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plan at .*plan/index.json"):
        aggregate(str(tmp_path / "nothing"), **_outputs(tmp_path))


def _job(seconds: float, held: float | None = None, queued: float | None = None) -> JobRecord:
    return JobRecord(
        backend="kubernetes",
        job_name="bi-run-1",
        images_uri="gs://images/coco",
        results_uri="gs://results/r1",
        model="google/vit-base-patch16-224",
        parameters={"batch_size": 256, "accelerator": "nvidia-h200-141gb"},
        nodes=1,
        world_size=2,
        started_at="2026-10-01T02:00:00+00:00",
        finished_at="2026-10-01T02:30:00+00:00",
        job_seconds=seconds,
        admitted_at="2026-10-01T02:00:00+00:00" if held is not None else "",
        ended_at="2026-10-01T02:30:00+00:00" if held is not None else "",
        held_seconds=held,
        queue_seconds=queued,
    )


def test_a_gpu_run_reports_what_it_was_and_what_it_cost(tmp_path):
    root = str(tmp_path / "results")
    write_layout(
        root, list(range(4)), parts={0: [0, 1, 2, 3]}, summaries=[_summary(0, 2, 5.0), _summary(1, 2, 6.0)]
    )
    out = _outputs(tmp_path)

    report = aggregate(root, **out, job=_job(1800.0), price_per_gpu_hour=10.0)

    m = report.metrics
    # Two GPUs for the job's half hour (its start-up included), not the ranks' 6 s.
    assert (m["gpus"], m["job_seconds"], m["gpu_hours"]) == (2, 1800.0, 1.0)
    assert m["cost"] == 10.0
    assert m["cost_per_million_images"] == 10.0 / 4 * 1e6
    text = " ".join(parse_html(Path(out["html_path"])).text)
    for fact in ("google/vit-base-patch16-224", "gs://images/coco", "bi-run-1", "2026-10-01T02:00:00+00:00"):
        assert fact in text
    for caption in ("GPU-hours", "Cost / million images", "nvidia-h200-141gb"):
        assert caption in text


def test_gpu_hours_count_from_admission_not_the_wait_for_capacity(tmp_path):
    root = str(tmp_path / "results")
    write_layout(
        root, list(range(4)), parts={0: [0, 1, 2, 3]}, summaries=[_summary(0, 2, 5.0), _summary(1, 2, 6.0)]
    )
    out = _outputs(tmp_path)
    # Three hours queued for DWS capacity, then half an hour holding the nodes.
    job = _job(3 * 3600.0 + 1800.0, held=1800.0, queued=3 * 3600.0)

    report = aggregate(root, **out, job=job, price_per_gpu_hour=10.0)

    m = report.metrics
    assert (m["gpus"], m["held_seconds"], m["queue_seconds"]) == (2, 1800.0, 3 * 3600.0)
    assert m["job_seconds"] == 3 * 3600.0 + 1800.0
    assert m["gpu_hours"] == 1.0 and m["cost"] == 10.0
    assert m["cost_per_million_images"] == 10.0 / 4 * 1e6
    # The report shows the wait apart from the time the GPUs were held.
    text = parse_html(Path(out["html_path"])).text
    waited = text.index("Waited for capacity (queued, no GPUs held)")
    held = text.index("Held its GPUs (admission to end)")
    assert (text[waited + 1], text[held + 1]) == ("10,800.0 s", "1,800.0 s")


def test_a_cpu_run_shows_no_gpu_time_or_cost(tmp_path):
    root = str(tmp_path / "results")
    summaries = [_summary(0, 2, 5.0, device="cpu"), _summary(1, 2, 6.0, device="cpu")]
    write_layout(root, list(range(4)), parts={0: [0, 1, 2, 3]}, summaries=summaries)
    out = _outputs(tmp_path)

    report = aggregate(root, **out, job=_job(60.0), price_per_gpu_hour=10.0)

    assert report.metrics["gpus"] == 0
    assert not {"gpu_hours", "cost", "cost_per_million_images"} & set(report.metrics)
    text = " ".join(parse_html(Path(out["html_path"])).text)
    assert "GPU" not in text and "Cost" not in text
