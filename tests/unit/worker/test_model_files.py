"""Model files from gs://, cached per node: by version, never an older copy of a rewritten model."""

from __future__ import annotations

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
