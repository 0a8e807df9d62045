"""The run's parameter checks: one line naming the parameter, before anything is uploaded."""

from __future__ import annotations

import pytest

from components.check.checks import check_input, check_run
from tests.support.helpers import upload_images, write_images

GOOD = {
    "images_uri": "gs://my-images/coco",
    "results_root": "gs://my-results/runs",
    "results_prefix": "",
    "model": "google/vit-base-patch16-224",
    "batch_size": 256,
    "shard_size": 1024,
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"images_uri": ""}, "images_uri is empty"),
        ({"images_uri": "gs://"}, "images_uri 'gs://'"),
        ({"images_uri": "gs:/my-images/coco"}, "images_uri 'gs:/my-images/coco' is not a gs://bucket/prefix"),
        ({"images_uri": "gs://My_Images/coco"}, "does not name a valid GCS bucket"),
        ({"images_uri": " gs://my-images/coco"}, "images_uri ' gs://my-images/coco' has leading or trailing"),
        ({"results_root": ""}, "results_root is empty"),
        ({"results_root": "s3://bucket/runs"}, "results_root 's3://bucket/runs' is not a gs://bucket/prefix"),
        ({"results_prefix": "gs://x"}, "results_prefix 'gs://x' does not name a valid GCS bucket"),
        ({"batch_size": 0}, "batch_size: --batch-size must be at least 1, got 0"),
        ({"shard_size": -1}, "shard_size: --shard-size must be at least 1, got -1"),
        ({"model": ""}, "model ''"),
        ({"upload_layout": "tarball"}, "upload_layout must be one of loose, packed, got 'tarball'"),
        ({"packed_shard_mb": 0}, "packed_shard_mb must be at least 1"),
    ],
)
def test_a_bad_parameter_is_named_in_one_line(change, message):
    with pytest.raises(ValueError) as caught:
        check_run(**(GOOD | change))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_good_parameters_and_local_paths_pass(tmp_path, tiny_model):
    good = GOOD | {"model": str(tiny_model)}
    check_run(**good)
    check_run(**(good | {"images_uri": str(tmp_path), "results_root": str(tmp_path / "out")}))
    check_run(**(good | {"results_root": "", "results_prefix": "gs://my-results/runs/r1"}))


def test_a_model_the_worker_cannot_run_is_named(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ValueError) as caught:
        check_run(**(GOOD | {"model": str(tmp_path / "not-a-model")}))
    message = str(caught.value)
    assert message.startswith("model: ") and "not-a-model" in message and "\n" not in message


def test_an_input_needs_at_least_one_image(tmp_path, gcs):
    (tmp_path / "empty" / "d").mkdir(parents=True)
    (tmp_path / "empty" / "d" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no images"):
        check_input("", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="holds no images"):
        check_input(str(tmp_path / "no-such-folder"), "gs://b/images")
    write_images(tmp_path / "images", 1)
    check_input(str(tmp_path / "images"), "gs://b/images")  # the source holds the images
    bucket = gcs.new_bucket("check")
    upload_images(gcs.client, bucket, "images", 1)
    check_input("", f"gs://{bucket}/images")
    with pytest.raises(ValueError, match="holds no images"):
        check_input("", f"gs://{bucket}/imag")  # a prefix names a folder, not a name's start
    check_input("https://example.com/val2017.zip", "gs://b/images")  # known only once downloaded


def test_packed_shards_and_archives_hold_images(tmp_path, gcs):
    from components.upload.upload import upload_dataset

    bucket = gcs.new_bucket("check-packed")
    write_images(tmp_path / "src", 2)
    upload_dataset(str(tmp_path / "src"), f"gs://{bucket}/ds", layout="packed")
    check_input("", f"gs://{bucket}/ds")  # no loose image there, only shards
    gcs.client.bucket(bucket).blob("coco/val2017.zip").upload_from_string(b"PK")
    check_input("", f"gs://{bucket}/coco/val2017.zip")
    check_input("", f"gs://{bucket}/coco")
