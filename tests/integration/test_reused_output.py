"""A results prefix reused by another run: refused in one line, replaced with --overwrite, never mixed.

The real worker under torchrun (gloo), on the GCS emulator and on local folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from components.aggregate.aggregate import aggregate
from tests.support.helpers import upload_images
from tests.support.worker_harness import assert_exactly_once, run_worker
from worker.results import PLAN_FILE, MixedResultsError, parse_part, part_name, read_run_record
from worker.storage import join, open_storage, write_text

pytestmark = pytest.mark.slow

SHARDS = ("--shard-size", "4", "--batch-size", "4")


def _refused(proc) -> str:
    """The one line a refused run prints; the worker's exit code is 2."""
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("python -m worker: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _parts(out: str) -> dict[str, bytes]:
    storage = open_storage(out)
    try:
        return {o.uri: storage.read(o.uri) for o in storage.list(join(out, "parts") + "/")}
    except FileNotFoundError:
        return {}


def _aggregate(out: str, tmp_path: Path):
    return aggregate(
        out,
        csv_path=str(tmp_path / "agg" / "results.csv"),
        parquet_path=str(tmp_path / "agg" / "results.parquet"),
        html_path=str(tmp_path / "agg" / "report.html"),
    )


def test_reused_output_is_refused_unless_overwritten_and_never_mixed(gcs, tiny_model, tmp_path):
    bucket = gcs.new_bucket("reuse")
    uris_a = upload_images(gcs.client, bucket, "a", 14)
    uris_b = upload_images(gcs.client, bucket, "b", 9)
    input_a, input_b, out = f"gs://{bucket}/a", f"gs://{bucket}/b", f"gs://{bucket}/out"
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    run_worker(input_a, out, str(model), 2, *SHARDS)
    assert_exactly_once(out, uris_a)
    committed = _parts(out)
    assert len(committed) == 4

    # Another input: refused at once, before the model loads, and nothing under OUT changes.
    line = _refused(run_worker(input_b, out, str(model), 1, *SHARDS, check=False))
    assert f"input was {input_a}, now {input_b}" in line and "--overwrite" in line
    # The same model directory, retrained in place: refused once its files are hashed.
    config = json.loads((model / "config.json").read_text())
    config["id2label"] = {k: f"v2-{v}" for k, v in config["id2label"].items()}
    (model / "config.json").write_text(json.dumps(config))
    line = _refused(run_worker(input_a, out, str(model), 1, *SHARDS, check=False))
    assert "model_revision was sha256:" in line
    assert _parts(out) == committed and read_run_record(out)["input"] == input_a

    # --overwrite: another input and the new model, a complete and correct result.
    run_worker(input_b, out, str(model), 2, *SHARDS, "--overwrite")
    parts, _ = assert_exactly_once(out, uris_b)
    assert all(row["classification"].startswith("v2-") for row in parts)
    fingerprint = read_run_record(out)["fingerprint"]
    assert {parse_part(u.rsplit("/", 1)[1])[1] for u in _parts(out)} == {fingerprint}
    assert _aggregate(out, tmp_path).metrics["classified"] == len(uris_b)
    # A part of another run that appears later is named by the aggregate, never merged.
    stale = join(out, "parts", part_name(0, "00000000ffffffff"))
    write_text(stale, "image_id,classification,label_index,score,uri\nx,cat,0,0.5,gs://elsewhere/x.jpg\n")
    with pytest.raises(MixedResultsError, match=f"another run .*{stale}"):
        _aggregate(out, tmp_path)

    # Another input's parts and no plan or record: never counted, so the fresh plan cannot
    # skip their shard numbers; the run is refused and names them.
    storage = open_storage(out)
    storage.delete(stale)
    for name in (PLAN_FILE, "run.json"):
        storage.delete(join(out, name))
    line = _refused(run_worker(input_a, out, str(model), 1, *SHARDS, check=False))
    assert f"parts of another run: {join(out, 'parts', part_name(0, fingerprint))} and 2 more" in line
