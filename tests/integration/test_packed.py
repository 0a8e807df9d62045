"""Packed datasets end to end: upload packed to the GCS emulator, classify under real torchrun."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from components.aggregate.aggregate import aggregate
from components.upload.upload import upload_dataset
from tests.support.helpers import jpeg_bytes, write_images
from tests.support.worker_harness import read_plan, read_results, run_worker
from worker.archives.packed import Manifest, ShardIndex

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FLAGS = ("--shard-size", "4", "--batch-size", "4", "--device", "cpu")


def _exactly_once(output: str, expected: list[str]) -> tuple[list[dict], list[dict]]:
    planned, parts, errors = read_results(output)
    assert sorted(planned) == sorted(expected) and len(planned) == len(expected)
    seen = Counter(r["uri"] for r in parts) + Counter(r["uri"] for r in errors)
    assert seen == Counter(expected), "every planned image once, in a part or an error file"
    return parts, errors


def _aggregate(results_uri: str, folder: Path) -> tuple[dict, pd.DataFrame]:
    paths = {k: str(folder / f"results.{k}") for k in ("csv", "parquet", "html")}
    report = aggregate(
        results_uri, csv_path=paths["csv"], parquet_path=paths["parquet"], html_path=paths["html"]
    )
    return report.metrics, pd.read_csv(paths["csv"])


@pytest.fixture(scope="module")
def dataset(gcs, tmp_path_factory) -> tuple[str, str, list[str], Path]:
    """20 images uploaded loose and packed (3 shards) to the same prefix: (bucket, prefix, uris, source)."""
    bucket = gcs.new_bucket("packed")
    src = tmp_path_factory.mktemp("src")
    paths = write_images(src, 20)
    prefix = f"gs://{bucket}/ds"
    upload_dataset(str(src), prefix)
    upload_dataset(str(src), prefix, layout="packed", shard_files=8)
    return bucket, prefix, [f"{prefix}/{p.relative_to(src).as_posix()}" for p in paths], src


def test_packed_run_gives_the_loose_run_rows_exactly_once(dataset, tiny_model, tmp_path):
    _, prefix, uris, _ = dataset
    loose, packed = str(tmp_path / "loose"), str(tmp_path / "packed")
    run_worker(prefix, loose, str(tiny_model), 2, *FLAGS, "--input-layout", "loose", "--no-compose")
    proc = run_worker(prefix, packed, str(tiny_model), 3, *FLAGS, "--assignment", "dynamic")
    assert "packed input" in proc.stdout
    loose_rows, loose_errors = _exactly_once(loose, uris)
    packed_rows, packed_errors = _exactly_once(packed, uris)
    assert not loose_errors and not packed_errors
    # CPU, fp32, the same bytes: every row equal, score included.
    assert sorted(packed_rows, key=lambda r: r["uri"]) == sorted(loose_rows, key=lambda r: r["uri"])
    plan = read_plan(str(packed))
    assert {p.member.archive.rsplit("/", 1)[-1] for p in plan} == {f"shard-00000{i}.tar" for i in range(3)}


def test_resume_after_a_kill(dataset, tiny_model, tmp_path):
    _, prefix, uris, _ = dataset
    out = tmp_path / "out"
    killed = run_worker(
        prefix, str(out), str(tiny_model), 2, *FLAGS, env={"WORKER_FAULT_KILL_AFTER_SHARDS": "1"}, check=False
    )
    assert killed.returncode != 0
    before = {p.name: p.read_bytes() for p in (out / "parts").glob("*.csv")}
    assert 1 <= len(before) < 5
    rerun = run_worker(prefix, str(out), str(tiny_model), 2, *FLAGS)
    assert "resuming" in rerun.stdout
    parts, errors = _exactly_once(str(out), uris)
    assert len(parts) == 20 and not errors
    assert all((out / "parts" / name).read_bytes() == data for name, data in before.items())


def test_an_added_image_is_one_new_shard_and_the_only_one_an_incremental_run_classifies(
    gcs, tiny_model, tmp_path
):
    bucket = gcs.new_bucket("append")
    src = tmp_path / "src"
    paths = write_images(src, 6)
    prefix = f"gs://{bucket}/ds"
    upload_dataset(str(src), prefix, layout="packed", shard_files=4)
    old = {
        b.name: (b.generation, b.md5_hash) for b in gcs.client.list_blobs(bucket, prefix="ds/packed/shard-")
    }
    run_a = f"gs://{bucket}/runs/a"
    run_worker(prefix, run_a, str(tiny_model), 1, *FLAGS, "--incremental")
    _aggregate(run_a, tmp_path / "a")

    (src / "new").mkdir()
    (src / "new" / "added.jpg").write_bytes(jpeg_bytes(500))
    report = upload_dataset(str(src), prefix, layout="packed", shard_files=4)
    assert (report.uploaded, report.shards_written) == (1, 1)
    now = {
        b.name: (b.generation, b.md5_hash) for b in gcs.client.list_blobs(bucket, prefix="ds/packed/shard-")
    }
    assert {k: now[k] for k in old} == old, "the existing shards are untouched"
    assert sorted(set(now) - set(old)) == ["ds/packed/shard-000002.index.json", "ds/packed/shard-000002.tar"]

    run_b = f"gs://{bucket}/runs/b"
    run_worker(prefix, run_b, str(tiny_model), 2, *FLAGS, "--incremental")
    planned, parts, errors = read_results(run_b)
    assert planned == [f"{prefix}/new/added.jpg"] and [r["uri"] for r in parts] == planned and not errors
    metrics, table = _aggregate(run_b, tmp_path / "b")
    assert (metrics["classified"], metrics["reused"]) == (1, 6)
    assert sorted(table["uri"]) == sorted(
        [f"{prefix}/{p.relative_to(src).as_posix()}" for p in paths] + planned
    )


def test_a_truncated_shard_and_a_corrupt_member_become_error_rows_naming_the_image(gcs, tiny_model, tmp_path):
    bucket = gcs.new_bucket("damaged")
    src = tmp_path / "src"
    write_images(src, 12)
    prefix = f"gs://{bucket}/ds"
    upload_dataset(str(src), prefix, layout="packed", shard_files=6)
    shards = gcs.client.bucket(bucket)
    manifest = Manifest.decode(shards.blob("ds/packed/manifest.json").download_as_bytes())
    first, second = (
        ShardIndex.decode(shards.blob(f"ds/packed/{s.index}").download_as_bytes()) for s in manifest.shards
    )
    # Damage, as a disk or a careless copy would: one byte of a member flipped, the other shard cut short.
    data = bytearray(shards.blob(f"ds/packed/{first.shard}").download_as_bytes())
    corrupt = first.members[2]
    data[corrupt.offset + corrupt.size // 2] ^= 0xFF
    shards.blob(f"ds/packed/{first.shard}").upload_from_string(bytes(data))
    cut = second.members[3].offset + 10
    data = shards.blob(f"ds/packed/{second.shard}").download_as_bytes()
    shards.blob(f"ds/packed/{second.shard}").upload_from_string(data[:cut])

    out = str(tmp_path / "out")
    run_worker(prefix, out, str(tiny_model), 1, *FLAGS)
    expected = [f"{prefix}/{e.name}" for e in first.members + second.members]
    parts, errors = _exactly_once(out, expected)
    reasons = {row["uri"]: row["reason"] for row in errors}
    truncated = [f"{prefix}/{e.name}" for e in second.members[3:]]
    assert sorted(reasons) == sorted([f"{prefix}/{corrupt.name}", *truncated])
    assert "CRC32C" in reasons[f"{prefix}/{corrupt.name}"]
    assert all("truncated" in reasons[u] for u in truncated)
    assert len(parts) == 12 - 1 - len(truncated)
    for path in Path(out, "errors").glob("*.csv"):
        with open(path) as fh:
            assert next(csv.reader(fh)) == ["uri", "reason"]
