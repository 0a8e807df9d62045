"""Zip archives read in place: the central directory by ranged reads, members from local records."""

from __future__ import annotations

import io
import zipfile

import pytest

from worker.archives import zip as zip_format
from worker.storage.local import LocalStorage

MEMBERS = {
    "val/000001.jpg": bytes(range(256)) * 40,
    "val/000002.jpg": b"stored " * 100,
    "ünï/cödé.png": b"z" * 3000,
    "notes.txt": b"not an image",
}


def _records(path):
    raw = path.read_bytes()
    entries = zip_format.central_directory(LocalStorage(), str(path), len(raw))
    return {e.name: zip_format.extract(raw[e.offset : e.offset + e.length]) for e in entries}


def test_stored_and_deflated_members_with_folders_and_a_comment(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.mkdir("val")
        for i, (name, data) in enumerate(MEMBERS.items()):
            zf.writestr(name, data, compress_type=zipfile.ZIP_STORED if i % 2 else zipfile.ZIP_DEFLATED)
        zf.comment = b"a comment" * 100
    assert _records(path) == MEMBERS


@pytest.mark.parametrize("zip64", [False, True])
def test_streamed_zip_with_data_descriptors(tmp_path, zip64):
    """As a zip written to a pipe or an upload stream is: sizes after the data, stored members too."""

    class Unseekable(io.RawIOBase):
        def __init__(self):
            self.buf = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.buf += b
            return len(b)

    sink = Unseekable()
    with zipfile.ZipFile(sink, "w") as zf:
        for i, (name, data) in enumerate(MEMBERS.items()):
            zf.compression = zipfile.ZIP_STORED if i % 2 else zipfile.ZIP_DEFLATED
            with zf.open(name, "w", force_zip64=zip64) as fh:
                fh.write(data)
    path = tmp_path / "streamed.zip"
    path.write_bytes(bytes(sink.buf))
    with zipfile.ZipFile(path) as zf:
        assert all(info.flag_bits & 0x8 for info in zf.infolist())  # the data-descriptor bit
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    assert _records(path) == MEMBERS
    raw = path.read_bytes()
    stored = next(
        e for e in zip_format.central_directory(LocalStorage(), str(path), len(raw)) if "2" in e.name
    )
    record = bytearray(raw[stored.offset : stored.offset + stored.length])
    record[len(record) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="CRC-32"):
        zip_format.extract(bytes(record))


def test_zip64_members(tmp_path):
    path = tmp_path / "z64.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in MEMBERS.items():
            with zf.open(name, "w", force_zip64=True) as fh:
                fh.write(data)
    assert _records(path) == MEMBERS


def test_a_corrupt_member_fails_its_crc_and_a_cut_one_is_short(tmp_path):
    path = tmp_path / "c.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in MEMBERS.items():
            zf.writestr(name, data)
    raw = path.read_bytes()
    entries = {e.name: e for e in zip_format.central_directory(LocalStorage(), str(path), len(raw))}
    e = entries["val/000002.jpg"]
    record = bytearray(raw[e.offset : e.offset + e.length])
    record[-5] ^= 0xFF
    with pytest.raises(ValueError, match="CRC-32"):
        zip_format.extract(bytes(record))
    with pytest.raises(ValueError, match="cut short"):
        zip_format.extract(bytes(record[:-50]))


def test_not_a_zip(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"PK not really" * 10)
    with pytest.raises(ValueError, match="not a zip"):
        zip_format.central_directory(LocalStorage(), str(path), path.stat().st_size)
