"""upload_dataset against the real GCS emulator and a real local HTTP server."""

from __future__ import annotations

import functools
import http.server
import logging
import stat
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

from components.upload.upload import UnsafeArchiveError, extract_zip, upload_dataset
from tests.support.helpers import jpeg_bytes, upload_images, write_images


@pytest.fixture()
def http_root(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile into a folder the test can inspect afterwards."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    return work


def _dataset(root: Path) -> dict[str, bytes]:
    """Images in nested folders plus a non-image file: everything must be uploaded."""
    write_images(root, 7)
    (root / "README.txt").write_text("not an image, still uploaded\n")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _contents(gcs, bucket: str, prefix: str) -> dict[str, bytes]:
    return {
        b.name[len(prefix) + 1 :]: b.download_as_bytes()
        for b in gcs.client.list_blobs(bucket, prefix=prefix + "/")
    }


def test_local_dir_upload_is_complete_and_idempotent(gcs, tmp_path, caplog):
    src = tmp_path / "src"
    expected = _dataset(src)
    # A symlink is not a regular file: it must not be followed or uploaded.
    (src / "link.jpg").symlink_to(src / "d0" / "img_00000.jpg")
    bucket = gcs.new_bucket()
    dest = f"gs://{bucket}/data/coco"

    with caplog.at_level(logging.INFO, logger="components.upload.upload"):
        first = upload_dataset(str(src), dest, workers=4)
    assert first.destination == dest
    assert (first.uploaded, first.skipped, first.total_objects) == (8, 0, 8)
    assert first.bytes_uploaded == first.total_bytes == sum(len(v) for v in expected.values())
    assert _contents(gcs, bucket, "data/coco") == expected
    assert any("files/s" in r.getMessage() and "MB/s" in r.getMessage() for r in caplog.records)

    second = upload_dataset(str(src), dest, workers=4)
    assert (second.uploaded, second.skipped, second.bytes_uploaded) == (0, 8, 0)

    # Same size, different bytes: only the checksum can tell, so this proves it is compared.
    changed = src / "d1" / "img_00001.jpg"
    data = bytearray(changed.read_bytes())
    data[-3] ^= 0xFF
    changed.write_bytes(bytes(data))
    third = upload_dataset(str(src), dest, workers=4)
    assert (third.uploaded, third.skipped, third.bytes_uploaded) == (1, 7, len(data))
    assert gcs.client.bucket(bucket).blob("data/coco/d1/img_00001.jpg").download_as_bytes() == bytes(data)


def _zip(path: Path, entries: dict[str, bytes], *, dirs: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for d in dirs:
            zf.writestr(d, b"")
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_zip_over_http(gcs, http_root, private_tmp):
    served, url = http_root
    entries = {f"val2017/{i:012d}.jpg": jpeg_bytes(i) for i in range(5)}
    entries["val2017/sub/notes.txt"] = b"hello"
    _zip(served / "val2017.zip", entries, dirs=("val2017/", "val2017/sub/"))
    bucket = gcs.new_bucket()

    report = upload_dataset(f"{url}/val2017.zip", f"gs://{bucket}/coco", workers=4)

    assert (report.uploaded, report.skipped, report.total_objects) == (6, 0, 6)
    assert _contents(gcs, bucket, "coco") == entries
    assert list(private_tmp.iterdir()) == []  # the download and extraction are cleaned up
    assert upload_dataset(f"{url}/val2017.zip", f"gs://{bucket}/coco").skipped == 6


def test_zip_with_parent_entry_is_rejected(gcs, http_root, private_tmp, tmp_path):
    served, url = http_root
    _zip(served / "bad.zip", {"ok/a.jpg": jpeg_bytes(1), "../evil": b"pwned"})
    bucket = gcs.new_bucket()

    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil"):
        upload_dataset(f"{url}/bad.zip", f"gs://{bucket}/coco")

    assert not [p for p in tmp_path.rglob("*") if p.name in ("evil", "a.jpg")]
    assert gcs.object_names(bucket) == []


@pytest.mark.parametrize(
    "path, error, message",
    [
        ("not-a-zip.zip", ValueError, "not a zip archive: http://"),
        ("absent.zip", OSError, "cannot download http://.*/absent.zip: HTTP Error 404"),
    ],
)
def test_bad_url_is_named(gcs, http_root, private_tmp, path, error, message):
    served, url = http_root
    (served / "not-a-zip.zip").write_text("<html>a login page</html>")
    bucket = gcs.new_bucket()
    with pytest.raises(error, match=message):
        upload_dataset(f"{url}/{path}", f"gs://{bucket}/coco")
    assert gcs.object_names(bucket) == [] and list(private_tmp.iterdir()) == []


@pytest.mark.parametrize(
    "name, why",
    [
        ("/etc/evil", "absolute"),
        ("C:/evil", "absolute"),
        ("a/../../evil", "escapes"),
        ("a\\..\\..\\evil", "escapes"),
        ("link", "symbolic link"),
    ],
)
def test_extract_zip_rejects_unsafe_entries(tmp_path, name, why):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if why == "symbolic link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"/etc/passwd")
    target = tmp_path / "out"

    with pytest.raises(UnsafeArchiveError, match=why) as err:
        extract_zip(archive, target)

    assert repr(name) in str(err.value)
    assert not target.exists()  # checked before anything is written


def test_gcs_to_gcs_copy(gcs):
    src_bucket, dst_bucket = gcs.new_bucket("src"), gcs.new_bucket("dst")
    upload_images(gcs.client, src_bucket, "images", 5)
    # A sibling prefix that merely starts with the same letters must not be copied.
    gcs.client.bucket(src_bucket).blob("images2/x.jpg").upload_from_string(b"x")

    report = upload_dataset(f"gs://{src_bucket}/images", f"gs://{dst_bucket}/copy/", workers=4)

    assert (report.uploaded, report.skipped, report.total_objects) == (5, 0, 5)
    assert _contents(gcs, dst_bucket, "copy") == _contents(gcs, src_bucket, "images")
    again = upload_dataset(f"gs://{src_bucket}/images/", f"gs://{dst_bucket}/copy")
    assert (again.uploaded, again.skipped) == (0, 5)


def test_missing_destination_bucket_is_named(gcs, tmp_path):
    write_images(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="GCS bucket does not exist: gs://no-such-bucket-7"):
        upload_dataset(str(tmp_path), "gs://no-such-bucket-7/x")


def test_destination_must_be_gcs(tmp_path):
    with pytest.raises(ValueError, match="gs://"):
        upload_dataset(str(tmp_path), str(tmp_path / "out"))
