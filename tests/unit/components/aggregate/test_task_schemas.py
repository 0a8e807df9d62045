"""The aggregate takes the columns a task declares: vectors and top-k lists from real worker runs."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.aggregate.aggregate import aggregate
from tests.support.html import parse_html
from tests.support.tasks import run_task
from worker.results import read_manifest, read_run_record
from worker.schema import decode_vector


def _aggregate(out, tmp_path):
    paths = {name: str(tmp_path / f"agg.{name}") for name in ("csv", "parquet", "html")}
    report = aggregate(
        str(out), csv_path=paths["csv"], parquet_path=paths["parquet"], html_path=paths["html"]
    )
    return report, paths


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embeddings_are_a_fixed_size_vector_column_in_parquet_and_absent_from_csv(
    dtype, models, task_images, tmp_path
):
    out = tmp_path / "out"
    rows = run_task(task_images, models("dinov2"), out, task="embedding", embedding_dtype=dtype)
    report, paths = _aggregate(out, tmp_path)
    assert report.complete and report.metrics["classified"] == len(task_images)

    table = pq.read_table(paths["parquet"])
    field = table.schema.field("embedding")
    assert field.type == pa.list_(getattr(pa, dtype)(), 32)  # fixed-size, in the declared type
    frame = table.to_pandas()
    for uri, vector in zip(frame["uri"], frame["embedding"], strict=True):
        np.testing.assert_array_equal(np.asarray(vector, dtype=dtype), rows[uri]["embedding"])
    # DuckDB reads the vectors as arrays of floats, no decoding.
    dims = duckdb.sql(f"SELECT DISTINCT len(embedding) FROM read_parquet('{paths['parquet']}')").fetchall()
    assert dims == [(32,)]

    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == ["image_id", "uri"]
    assert csv["uri"].tolist() == sorted(rows)
    # No labels, so the report counts none.
    text = " ".join(parse_html(Path(paths["html"])).text)
    assert "Distinct classes" not in text and "Top " not in text and "Images planned" in text
    # The manifest keeps the vectors' exact bytes, for the next incremental run.
    manifest = read_manifest(str(out / "aggregate" / "results.parquet"))
    record = read_run_record(str(out))
    kind = next(c["kind"] for c in record["columns"] if c["name"] == "embedding")
    for uri, cell in zip(manifest["uri"], manifest["embedding"], strict=True):
        np.testing.assert_array_equal(np.frombuffer(cell, dtype=np.dtype(kind[7:-1])), rows[uri]["embedding"])


def test_top_k_labels_are_list_columns(models, task_images, tmp_path):
    out = tmp_path / "out"
    labels = ["cat", "dog", "bird", "car"]
    rows = run_task(task_images, models("clip"), out, task="zero-shot", labels=",".join(labels), top_k=3)
    report, paths = _aggregate(out, tmp_path)
    assert report.complete and report.summary_column == "classification"
    assert sum(n for _, n in report.top_classes) == len(task_images)

    frame = pd.read_parquet(paths["parquet"])
    for _, row in frame.iterrows():
        part = rows[row["uri"]]
        assert list(row["top_labels"]) == json.loads(part["top_labels"])
        assert list(row["top_label_indices"]) == json.loads(part["top_label_indices"])
        assert list(row["top_scores"]) == pytest.approx(json.loads(part["top_scores"]))
        assert row["top_labels"][0] == row["classification"]
    best = duckdb.sql(
        f"SELECT top_labels[1] = classification FROM read_parquet('{paths['parquet']}')"
    ).fetchall()
    assert all(ok for (ok,) in best)
    # The CSV holds the lists as JSON arrays.
    csv = pd.read_csv(paths["csv"])
    assert [json.loads(v) for v in csv["top_labels"]] == [list(v) for v in frame["top_labels"]]


def test_a_vector_cell_round_trips_exactly():
    from worker.schema import encode_vector

    vector = np.random.default_rng(0).standard_normal(7).astype(np.float32)
    np.testing.assert_array_equal(
        decode_vector(encode_vector(vector.tolist(), "vector<float32>"), "vector<float32>"), vector
    )
