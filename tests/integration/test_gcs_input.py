"""The worker's gs:// input under real torchrun, through a latency-and-fault proxy on loopback."""

from __future__ import annotations

import json

import pytest

from tests.support.gcs_proxy import Faults, GcsProxy
from tests.support.helpers import upload_images
from tests.support.worker_harness import assert_exactly_once, run_worker
from worker.storage import open_storage

pytestmark = pytest.mark.slow


def test_exactly_once_under_injected_503s_429s_and_dropped_connections(gcs, tiny_model):
    bucket = gcs.new_bucket("faults")
    uris = upload_images(gcs.client, bucket, "data", 300)
    output = f"gs://{bucket}/results"
    faults = Faults(delay=0.005, unavailable=0.05, throttled=0.02, dropped=0.02, seed=15)
    with GcsProxy(gcs.url, faults) as proxy:
        run_worker(
            f"gs://{bucket}/data",
            output,
            str(tiny_model),
            2,
            "--shard-size",
            "64",
            "--batch-size",
            "16",
            "--list-processes",
            "2",
            "--read-concurrency",
            "6",
            env={"STORAGE_EMULATOR_HOST": proxy.url},
        )
    parts, errors = assert_exactly_once(output, uris)
    assert len(parts) == 300 and not errors
    storage = open_storage(output)
    summaries = [json.loads(storage.read(f"{output}/summary/rank-{r}.json")) for r in (0, 1)]
    injected = proxy.counters.native_injected
    assert injected > 0
    # Every fault injected into the native reader's GETs was one retry, counted where it happened
    # (the worker's other reads, of its own record and plan, retry inside google-cloud-storage).
    assert sum(s["read_retries"] for s in summaries) == injected
    assert sum(s["read_requests"] for s in summaries) == proxy.counters.native_reads == 300 + injected
    for s in summaries:
        assert s["requests_per_image"] == pytest.approx(s["read_requests"] / s["images"], abs=1e-4)
    # Two ranks, each keeping at most 6 reads in flight.
    assert 6 <= proxy.counters.peak_reads_in_flight <= 12


def test_every_legal_gcs_name_is_classified_through_the_native_reader(gcs, tiny_model):
    """Names obstore cannot express (a ``..`` or ``.`` segment, a leading ``/``, ``//`` inside) are
    read through the JSON API: each ends as a row, none is retried, and a corrupt one is an error row.
    """
    from tests.support.helpers import jpeg_bytes

    bucket, results = gcs.new_bucket("names"), gcs.new_bucket("names-out")
    good = jpeg_bytes(7)
    payloads = {
        "/lead.jpg": jpeg_bytes(1),
        "a/../up.jpg": jpeg_bytes(2),
        "a//double.jpg": jpeg_bytes(3),
        "a/./dot.jpg": jpeg_bytes(4),
        "plain/ok.jpg": jpeg_bytes(5),
        "b/../corrupt.jpg": good[: len(good) // 3],
    }
    for name, data in payloads.items():
        gcs.client.bucket(bucket).blob(name).upload_from_string(data)
    uris = [f"gs://{bucket}/{name}" for name in payloads]
    output = f"gs://{results}/run"
    run_worker(f"gs://{bucket}", output, str(tiny_model), 1, "--shard-size", "4", "--list-processes", "2")
    parts, errors = assert_exactly_once(output, uris)
    assert [e["uri"] for e in errors] == [f"gs://{bucket}/b/../corrupt.jpg"]
    assert "read failed" not in errors[0]["reason"]  # read, then refused by the decoder
    assert {r["image_id"] for r in parts} == {"lead", "up", "double", "dot", "ok"}
    summary = json.loads(open_storage(output).read(f"{output}/summary/rank-0.json"))
    assert summary["read_retries"] == 0 and summary["read_requests"] == len(payloads)
