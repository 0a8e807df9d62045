"""Stage 1 on the GCS emulator: what the plan lists, and what it must not drop or add."""

from __future__ import annotations

import pytest

from worker.config import WorkerConfig
from worker.plan import list_input

CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")


def _put(gcs, bucket: str, names: list[str], storage_class: str | None = None) -> None:
    b = gcs.client.bucket(bucket)
    for name in names:
        blob = b.blob(name)
        if storage_class:
            blob.storage_class = storage_class
        blob.upload_from_string(b"\xff\xd8 not decoded here")


def _planned(bucket: str, prefix: str, *, incremental: bool) -> list[str]:
    cfg = WorkerConfig(
        input=f"gs://{bucket}/{prefix}",
        output=f"gs://{bucket}/out",
        model="m",
        incremental=incremental,
        list_processes=2,
    )
    return [o.uri.split(f"gs://{bucket}/", 1)[1] for o in list_input(cfg).sorted()]


@pytest.mark.parametrize("incremental", [False, True], ids=["fast-list", "list"])
def test_every_storage_class_is_planned(gcs, incremental):
    bucket = gcs.new_bucket("classes")
    expected = []
    for storage_class in CLASSES:
        names = [f"in/{storage_class.lower()}/{i}.jpg" for i in range(3)]
        _put(gcs, bucket, names, storage_class)
        expected += names
    listed = {b.name: b.storage_class for b in gcs.client.list_blobs(bucket)}
    assert set(listed.values()) == set(CLASSES), "the emulator must keep each object's class"
    assert _planned(bucket, "in", incremental=incremental) == sorted(expected)


@pytest.mark.parametrize("incremental", [False, True], ids=["fast-list", "list"])
def test_the_input_prefix_is_a_folder_and_only_root_composites_are_skipped(gcs, incremental):
    bucket = gcs.new_bucket("folders")
    inside = ["pre/a.jpg", "pre/deep/b.jpg", "pre/dataflux-composed-objects/user.jpg"]
    outside = ["pre2/c.jpg", "preview.jpg", "dataflux-composed-objects/0123abcd.jpg", "out/pre/x.jpg"]
    _put(gcs, bucket, inside + outside)
    assert _planned(bucket, "pre", incremental=incremental) == sorted(inside)
    assert _planned(bucket, "pre/", incremental=incremental) == sorted(inside)
    # At the bucket root, a user's folder of that name below the root is data; DataFlux's own
    # temporary folder at the root is not, and neither is the run's output.
    root = _planned(bucket, "", incremental=incremental)
    assert root == sorted(set(inside + outside) - {"dataflux-composed-objects/0123abcd.jpg", "out/pre/x.jpg"})
