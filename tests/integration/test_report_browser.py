"""The aggregate's report as a person sees it: rendered by a real headless Chromium.

One real worker run (torchrun, two CPU ranks, a corrupt image among the inputs) feeds both
cases: a local run, and the same results as a recorded Kubernetes run would leave them (a job
record of a TrainJob that queued for DWS capacity, and the summaries of GPU ranks).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from components.aggregate.aggregate import aggregate
from components.launch.job_record import JobRecord
from pipelines.dev.sample_images import make_sample_images
from tests.support.browser import chromium, render
from tests.support.html import parse_html
from tests.support.worker_harness import run_worker
from worker.telemetry import Timeline

pytestmark = pytest.mark.skipif(chromium() is None, reason="no Chromium: bash scripts/setup.sh installs it")

RANKS = 2


@pytest.fixture(scope="module")
def worker_output(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("report-run")
    make_sample_images(root / "images", 40)
    run_worker(
        str(root / "images"),
        str(root / "out"),
        str(tiny_model),
        RANKS,
        "--shard-size",
        "8",
        "--batch-size",
        "4",
    )
    return root / "out"


def _job(backend: str, results: Path, **overrides) -> JobRecord:
    fields = dict(
        backend=backend,
        job_name="",
        images_uri="gs://my-images/photos",
        results_uri=str(results),
        model="google/vit-base-patch16-224",
        parameters={"batch_size": 4, "shard_size": 8, "device": "auto", "local_nproc": RANKS},
        nodes=1,
        world_size=RANKS,
        started_at="2026-12-01T02:00:00+00:00",
        finished_at="2026-12-01T02:01:00+00:00",
        job_seconds=60.0,
        admitted_at="2026-12-01T02:00:00+00:00",
        ended_at="2026-12-01T02:01:00+00:00",
        held_seconds=60.0,
        queue_seconds=None,
    )
    return JobRecord(**(fields | overrides))


def _aggregate(results: Path, tmp_path: Path, job: JobRecord, price: float = 0.0) -> Path:
    html = tmp_path / "report.html"
    aggregate(
        str(results),
        csv_path=str(tmp_path / "results.csv"),
        parquet_path=str(tmp_path / "results.parquet"),
        errors_path=str(tmp_path / "errors.csv"),
        html_path=str(html),
        job=job,
        price_per_gpu_hour=price,
    )
    parse_html(html)  # self-contained and well-formed before any browser sees it
    return html


def _visible_text(dom: str) -> str:
    """The rendered DOM's text, tags and the stylesheet removed, whitespace collapsed."""
    dom = re.sub(r"<style>.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def _section(dom: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', dom, flags=re.S)
    assert match, f"no section #{anchor} on the page"
    return match.group(1)


def test_a_local_run_report_shows_its_curves_start_up_scores_and_errors(worker_output, tmp_path):
    html = _aggregate(worker_output, tmp_path, _job("local", worker_output))
    shot = tmp_path / "report.png"

    dom = render(html, screenshot=shot)

    text = _visible_text(dom)
    throughput = _section(dom, "throughput")
    # One curve per rank in each time chart: images per second, and the wait for input.
    assert throughput.count("<polyline") == 2 * RANKS
    for caption in ("Images per second over time", "Waiting for input (share of time)", "rank 0", "rank 1"):
        assert caption in text
    startup = _visible_text(_section(dom, "startup"))
    for step in ("Model fetch", "Model load", "Warm-up", "First batch"):
        assert step in startup
    assert _section(dom, "startup").count("<rect") >= 4 * RANKS
    scores = _section(dom, "scores")
    assert "Distribution of score" in text and 1 <= scores.count("<rect") <= 20
    errors = _visible_text(_section(dom, "errors"))
    assert "Errors: 1" in errors and "undecodable image" in errors and "not_really_an_image.jpg" in errors
    what_ran = _visible_text(_section(dom, "what-ran"))
    revision = json.loads((worker_output / "run.json").read_text())["model_revision"]
    for fact in ("google/vit-base-patch16-224", revision, "torch ", "transformers ", "local"):
        assert fact in what_ran
    # A CPU run says nothing of GPUs, and says why it has no cost.
    assert "GPU" not in text
    assert "no accelerators" in _visible_text(_section(dom, "time"))
    # The screenshot is the page drawn, not a blank window.
    with Image.open(shot) as image:
        assert image.size == (1100, 2400)
        assert len(image.convert("RGB").getcolors(1 << 20) or ()) > 50


def _as_gpu_ranks(results: Path) -> None:
    """Rewrite the rank summaries as GPU ranks write them: a CUDA device, the GPU's busy time in
    the timeline, and a warm-up that compiled the forward into a CUDA graph."""
    for path in sorted((results / "summary").glob("rank-*.json")):
        summary = json.loads(path.read_text())
        timeline = Timeline(first_interval=30.0)
        images = summary["images"]
        for minute in range(1, 21):
            done = images * minute // 20
            timeline.observe(60.0 * minute, done, 0.85 * 60 * minute, 0.05 * 60 * minute)
        summary |= {
            "device": "cuda",
            "seconds": 1200.0,
            "gpu_busy": 0.85,
            "input_wait": 0.05,
            "timeline": timeline.summary(1200.0, images, 1020.0, 60.0),
            "setup_done_at": {
                "imports": 6.1,
                "process_group": 7.0,
                "model_fetched": 31.5,
                "model_loaded": 36.2,
                "first_forward": 41.0,
                "warmed_up": 118.4,
                "plan_shared": 118.5,
                "decoder_ready": 119.9,
                "first_batch": 121.3,
            },
        }
        path.write_text(json.dumps(summary))


@pytest.mark.parametrize("price", [0.0, 10.0])
def test_a_recorded_kubernetes_run_report_shows_the_queue_the_gpus_and_the_cost(
    worker_output, tmp_path, price
):
    results = tmp_path / "results"
    shutil.copytree(worker_output, results)
    _as_gpu_ranks(results)
    job = _job(
        "kubernetes",
        results,
        job_name="bi-20261201-0200",
        parameters={
            "batch_size": 256,
            "job_kind": "trainjob",
            "nodes": 2,
            "gpus_per_node": 1,
            "accelerator": "nvidia-h200-141gb",
            "queue": "dws-local-queue",
            "image": "us-central1-docker.pkg.dev/my-project/batch/worker:v1",
        },
        nodes=2,
        started_at="2026-12-01T02:00:00+00:00",
        admitted_at="2026-12-01T02:40:00+00:00",
        finished_at="2026-12-01T03:02:00+00:00",
        ended_at="2026-12-01T03:02:00+00:00",
        job_seconds=3720.0,
        queue_seconds=2400.0,
        held_seconds=1320.0,
    )
    html = _aggregate(results, tmp_path, job, price)

    dom = render(html)

    text = _visible_text(dom)
    time_and_cost = _visible_text(_section(dom, "time"))
    # Each card shows its figure above its caption.
    assert "40 min Queued for capacity" in time_and_cost
    assert "22 min Held its GPUs" in time_and_cost
    assert "0.733 GPU-hours" in time_and_cost  # 2 GPUs x 1,320 s, the 40 min queued not counted
    if price:
        assert "Cost / million images" in time_and_cost and "price_per_gpu_hour" not in time_and_cost
    else:
        assert "Cost" not in time_and_cost.replace("cost", "")  # no figure, only how to get one
        assert "--price-per-gpu-hour" in time_and_cost
    throughput = _section(dom, "throughput")
    assert "GPU busy with the model (share of time)" in text
    assert throughput.count("<polyline") == 3 * RANKS
    assert "Compile and CUDA graph" in _visible_text(_section(dom, "startup"))
    what_ran = _visible_text(_section(dom, "what-ran"))
    for fact in ("kubernetes, trainjob (bi-20261201-0200)", "Nodes / processes 2 / 2", "nvidia-h200-141gb"):
        assert fact in what_ran
    assert "worker:v1" in what_ran
