"""The storage seam: the same interface over local files and the real GCS emulator."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT
from worker.storage import (
    ObjectInfo,
    absolute,
    folder,
    is_gcs,
    join,
    open_storage,
    split_uri,
)


@pytest.fixture
def root(any_prefix) -> str:
    return any_prefix


def test_uri_helpers():
    assert split_uri("gs://b/a/c.jpg") == ("b", "a/c.jpg") and split_uri("gs://b") == ("b", "")
    for bad in ("/local/path", "gs:///x"):
        with pytest.raises(ValueError):
            split_uri(bad)
    assert is_gcs("gs://b/x") and not is_gcs("/gs://b") and not is_gcs("gsx://b")
    assert folder("gs://b/pre") == folder("gs://b/pre/") == "gs://b/pre/"
    assert join("gs://b/", "/x/", "y.csv") == "gs://b/x/y.csv"
    assert absolute("gs://b/rel") == "gs://b/rel" and absolute("rel").startswith("/")


def test_importing_the_seam_loads_no_cloud_client():
    code = (
        "import sys, worker.storage, worker.results, worker.plan; "
        "worker.storage.open_storage('/tmp'); "
        "print(sorted(m for m in sys.modules if m.startswith(('google.cloud.storage', 'dataflux'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_backend_per_scheme_and_options(gcs):
    assert open_storage("/a") is open_storage("/b")
    assert open_storage("gs://x/a") is open_storage("gs://y/b")
    assert open_storage("gs://x/a", compose=True) is not open_storage("gs://x/a")


def test_write_create_only_stat_list_copy_and_upload(root, tmp_path):
    storage = open_storage(root)
    a = join(root, "d", "a.bin")
    assert storage.stat(a) is None and not storage.exists(a)
    assert storage.write(a, b"first", if_absent=True)
    assert not storage.write(a, b"second", if_absent=True), (
        "a create-only write must lose to an existing object"
    )
    assert storage.read(a) == b"first"
    first = storage.stat(a)
    assert first.uri == a and first.size == 5
    storage.write(a, b"overwritten")
    second = storage.stat(a)
    assert second.size == 11
    if is_gcs(root):
        assert second.generation is not None and second.generation != first.generation
        assert second.crc32c and second.crc32c != first.crc32c

    storage.copy(a, join(root, "copied", "a.bin"))
    files = []
    for i in range(5):
        path = tmp_path / f"file{i}"
        path.write_bytes(bytes([i]) * (i + 1))
        files.append((str(path), join(root, "up", f"f{i}")))
    files.append((str(tmp_path / "no-such-file"), join(root, "up", "missing")))
    results = storage.upload_files(files, workers=3)
    assert [r is None for r in results] == [True] * 5 + [False]

    listed = list(storage.list(folder(root)))
    assert sorted(o.uri[len(folder(root)) :] for o in listed) == [
        "copied/a.bin",
        "d/a.bin",
        *(f"up/f{i}" for i in range(5)),
    ]
    sizes = {o.uri: o.size for o in listed}
    assert sizes[join(root, "copied", "a.bin")] == 11 and sizes[join(root, "up", "f4")] == 5
    assert storage.read(join(root, "up", "f2")) == b"\x02\x02\x02"
    assert all(isinstance(o, ObjectInfo) for o in listed)


def test_missing_objects_and_buckets_are_file_not_found(root, gcs):
    storage = open_storage(root)
    with pytest.raises(FileNotFoundError):
        storage.read(join(root, "nope"))
    missing = "gs://no-such-bucket-seam/x" if is_gcs(root) else join(root, "no", "such", "dir")
    with pytest.raises(FileNotFoundError, match="no.such"):
        list(storage.list(missing))
