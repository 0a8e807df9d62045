"""Model files from gs://, cached per node: by version, never an older copy of a rewritten model."""

from __future__ import annotations

import pytest

from worker import model_files
from worker.fingerprint import model_revision
from worker.model_files import fetch_model


def test_a_gs_model_rewritten_in_place_is_fetched_anew(gcs, tmp_path):
    bucket = gcs.client.bucket(gcs.new_bucket("model"))
    model = f"gs://{bucket.name}/models/m"
    bucket.blob("models/m/config.json").upload_from_string('{"model_type": "vit"}')
    bucket.blob("models/m/model.safetensors").upload_from_string(b"weights v1")
    cache = str(tmp_path / "cache")

    first = fetch_model(model, cache, download=True)
    assert fetch_model(model, cache, download=False) == first  # the node's other ranks
    bucket.blob("models/m/model.safetensors").upload_from_string(b"weights v2")
    second = fetch_model(model, cache, download=True)

    assert second != first
    assert open(f"{second}/model.safetensors", "rb").read() == b"weights v2"
    assert model_revision(second) != model_revision(first)


def test_a_gs_model_is_downloaded_in_parallel_pieces_and_checked(gcs, tmp_path, monkeypatch):
    monkeypatch.setattr(model_files, "DOWNLOAD_PIECE", 1000)  # a 5,500-byte file is six pieces
    bucket = gcs.client.bucket(gcs.new_bucket("pieces"))
    weights = bytes(range(256)) * 21 + b"tail" * 31  # 5,500 bytes
    bucket.blob("m/model.safetensors").upload_from_string(weights)
    bucket.blob("m/empty.txt").upload_from_string(b"")
    model = f"gs://{bucket.name}/m"

    path = fetch_model(model, str(tmp_path / "cache"), download=True)

    assert open(f"{path}/model.safetensors", "rb").read() == weights
    assert open(f"{path}/empty.txt", "rb").read() == b""


def test_a_file_that_is_not_the_listed_one_is_never_published(gcs, tmp_path):
    bucket = gcs.client.bucket(gcs.new_bucket("changed"))
    bucket.blob("m/model.safetensors").upload_from_string(b"weights v1")
    model = f"gs://{bucket.name}/m"
    listed = model_files._gcs_listing(model, None)
    bucket.blob("m/model.safetensors").upload_from_string(b"weights v2")  # same size, other bytes
    target = tmp_path / "cache" / "gcs-listed"

    with pytest.raises(model_files.ModelChangedError, match="changed while it was downloaded"):
        model_files._download_gcs_dir(model, listed, target, None)
    assert not target.exists() and list(target.parent.iterdir()) == []
