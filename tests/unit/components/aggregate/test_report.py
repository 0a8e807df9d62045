"""The report's size does not grow with the run: ten million images on 128 GPUs stay under 1 MB."""

from __future__ import annotations

from pathlib import Path

from components.aggregate.report import render_report
from components.aggregate.summary import AggregateReport
from components.launch.job_record import JobRecord
from tests.support.html import parse_html
from worker.telemetry import Timeline

IMAGES = 10_000_000
RANKS = 128  # 16 nodes of 8 GPUs
BATCH = 256


def _rank_summary(rank: int) -> dict:
    """A rank as the worker summarises it, its timeline sampled by the worker's own ``Timeline``."""
    images = IMAGES // RANKS
    rate = 2_000.0 + 7 * rank  # img/s; each rank a little different
    timeline = Timeline()
    done = 0
    while done < images:
        done = min(images, done + BATCH)
        seconds = done / rate
        timeline.observe(seconds, done, 0.9 * seconds, 0.02 * seconds)
    seconds = images / rate
    return {
        "rank": rank,
        "world_size": RANKS,
        "device": "cuda",
        "images": images,
        "errors": 1_000 + rank,
        "shards": images // 1_000,
        "seconds": seconds,
        "images_per_second": rate,
        "gpu_busy": 0.9,
        "input_wait": 0.02,
        "timeline": timeline.summary(seconds, images, 0.9 * seconds, 0.02 * seconds),
        "setup_done_at": {
            "imports": 5.0,
            "process_group": 6.0,
            "model_fetched": 30.0 + rank % 8,
            "model_loaded": 35.0 + rank % 8,
            "first_forward": 40.0 + rank % 8,
            "warmed_up": 110.0 + rank % 8,
            "plan_shared": 111.0 + rank % 8,
            "decoder_ready": 112.0 + rank % 8,
            "first_batch": 113.0 + rank % 8,
        },
        "versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": "4.57.0"},
    }


def test_a_ten_million_image_report_stays_under_a_megabyte(tmp_path):
    ranks = [_rank_summary(r) for r in range(RANKS)]
    errors = sum(r["errors"] for r in ranks)
    report = AggregateReport(
        results_uri="gs://results/runs/big",
        metrics={
            "images": IMAGES,
            "classified": IMAGES - errors,
            "errors": errors,
            "missing": 0,
            "duplicated": 0,
            "unexpected": 0,
            "rows": IMAGES - errors,
            "reused": 0,
            "changed": 0,
            "deleted": 0,
            "distinct_classes": 1000,
            "images_per_second": 250_000.0,
            "wall_seconds": 40.0,
            "ranks": RANKS,
            "gpus": RANKS,
            "job_seconds": 3600.0,
            "held_seconds": 600.0,
            "queue_seconds": 3000.0,
            "gpu_hours": RANKS / 6,
            "cost": 100.0,
            "cost_per_million_images": 10.0,
        },  # fmt: skip
        top_classes=[(f"class {i} " + "x" * 60, 10_000 - i) for i in range(20)],
        errors_sample=[
            (f"gs://images/{'d' * 80}/{i:012d}.jpg", "undecodable image: " + "y" * 120) for i in range(100)
        ],
        errors_by_reason=[(f"reason {i}", 100 - i) for i in range(20)],
        ranks=ranks,
        job=JobRecord(
            backend="kubernetes",
            job_name="bi-big",
            images_uri="gs://images",
            results_uri="gs://results/runs/big",
            model="google/vit-base-patch16-224",
            parameters={"job_kind": "trainjob", "nodes": 16},
            nodes=16,
            world_size=RANKS,
            started_at="2026-12-01T00:00:00+00:00",
            finished_at="2026-12-01T01:00:00+00:00",
            job_seconds=3600.0,
            admitted_at="2026-12-01T00:50:00+00:00",
            ended_at="2026-12-01T01:00:00+00:00",
            held_seconds=600.0,
            queue_seconds=3000.0,
        ),  # fmt: skip
        price_per_gpu_hour=10.0,
        run={"model_revision": "a" * 40, "task": "classification"},
        score_column="score",
        score_histogram=[(i / 20, (i + 1) / 20, 500_000) for i in range(20)],
    )

    page = render_report(report)

    size = len(page.encode("utf-8"))
    print(f"report for {IMAGES:,} images on {RANKS} ranks: {size:,} bytes")
    assert size < 1_000_000
    path = tmp_path / "report.html"
    path.write_text(page)
    text = " ".join(parse_html(Path(path)).text)
    # Beyond a dozen ranks the curves are the slowest, median and fastest rank; every rank keeps its row.
    assert "slowest rank" in text and "median rank" in text and "fastest rank" in text
    assert page.count("<polyline") == 3 * 3
    assert f"<summary>Every rank ({RANKS})</summary>" in page  # folded, every rank still there
    assert f'<td class="n">{RANKS - 1}</td><td>cuda</td>' in page


def test_a_cpu_job_that_queued_for_capacity_says_nothing_of_gpus(tmp_path):
    ranks = [_rank_summary(r) | {"device": "cpu", "gpu_busy": 0.0} for r in range(2)]
    report = AggregateReport(
        results_uri="gs://results/runs/cpu",
        metrics={
            "images": 10,
            "classified": 10,
            "errors": 0,
            "missing": 0,
            "duplicated": 0,
            "unexpected": 0,
            "rows": 10,
            "reused": 0,
            "changed": 0,
            "deleted": 0,
            "distinct_classes": 2,
            "images_per_second": 1.0,
            "wall_seconds": 10.0,
            "ranks": 2,
            "gpus": 0,
            "job_seconds": 100.0,
            "held_seconds": 40.0,
            "queue_seconds": 60.0,
        },  # fmt: skip
        ranks=ranks,
        job=JobRecord(
            backend="kubernetes",
            job_name="bi-cpu",
            images_uri="gs://images",
            results_uri="gs://results/runs/cpu",
            model="m",
            parameters={"job_kind": "jobset", "device": "cpu"},
            nodes=2,
            world_size=2,
            started_at="2026-12-01T00:00:00+00:00",
            finished_at="2026-12-01T00:01:40+00:00",
            job_seconds=100.0,
            admitted_at="2026-12-01T00:01:00+00:00",
            ended_at="2026-12-01T00:01:40+00:00",
            held_seconds=40.0,
            queue_seconds=60.0,
        ),  # fmt: skip
        price_per_gpu_hour=10.0,
    )
    path = tmp_path / "report.html"
    path.write_text(render_report(report))

    text = " ".join(parse_html(path).text)
    assert "Queued for capacity" in text and "Waited for capacity (queued)" in text
    assert "GPU" not in text and "Cost" not in text
    assert "no accelerators" in text
