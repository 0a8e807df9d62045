"""Tar headers for packing, and listing the members of a tar by ranged reads."""

from __future__ import annotations

import io
import logging
import tarfile

import pytest

from worker.archives import tar
from worker.storage.local import LocalStorage


def test_headers_and_padding_make_a_tar_that_tarfile_reads_with_the_offsets_we_compute():
    members = {"a.jpg": b"x" * 700, "d/" + "long-name-" * 20 + ".jpg": b"y" * 512, "ünï/cödé.png": b""}
    data = bytearray()
    offsets = {}
    for name, payload in members.items():
        data += tar.member_header(name, len(payload), mtime=1_700_000_000)
        offsets[name] = len(data)
        data += payload + tar.padding(len(payload))
    data += tar.END_OF_ARCHIVE
    assert len(data) % tar.BLOCK == 0
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        got = {m.name: (m.offset_data, tf.extractfile(m).read()) for m in tf.getmembers()}
    assert got == {name: (offsets[name], payload) for name, payload in members.items()}


def _user_tar(path, members):
    """A tar as other tools write them: folders, links, WebDataset sidecars, GNU long names."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.jpg"
        tf.addfile(link)


def test_scan_lists_regular_members_with_their_data_offsets(tmp_path):
    members = {"000001.jpg": b"a" * 3000, "000001.cls": b"7", "sub/" + "n" * 150 + ".jpg": b"b" * 10}
    path = tmp_path / "user.tar"
    _user_tar(path, members)
    storage = LocalStorage()
    raw = path.read_bytes()
    found = list(tar.scan(storage, str(path), len(raw)))
    assert [m.name for m in found] == list(members)
    for m in found:
        assert raw[m.offset : m.offset + m.size] == members[m.name]


def test_scan_reads_in_chunks_smaller_than_the_tar(tmp_path):
    members = {f"{i:03d}.jpg": bytes([i]) * 5000 for i in range(20)}
    path = tmp_path / "many.tar"
    _user_tar(path, members)
    raw = path.read_bytes()
    f = tar.RangeFile(LocalStorage(), str(path), len(raw), chunk=4096)
    with tarfile.open(fileobj=f, mode="r:") as tf:
        assert [m.name for m in tf.getmembers() if m.isreg()] == list(members)


def test_a_cut_tar_lists_the_member_it_cuts_and_warns(tmp_path, caplog):
    members = {"a.jpg": b"a" * 2000, "b.jpg": b"b" * 2000, "c.jpg": b"c" * 2000}
    path = tmp_path / "cut.tar"
    _user_tar(path, members)
    raw = path.read_bytes()
    names = [m.name for m in tar.scan(LocalStorage(), str(path), len(raw))]
    cut = raw.index(b"b" * 2000) + 100  # inside b.jpg's data
    path.write_bytes(raw[:cut])
    with caplog.at_level(logging.WARNING):
        found = list(tar.scan(LocalStorage(), str(path), cut))
    assert [m.name for m in found] == names[:2]  # b.jpg's header is there, its data is not
    path.write_bytes(raw[: raw.index(b"c" * 2000) - 300])  # inside c.jpg's header
    with caplog.at_level(logging.WARNING):
        found = list(tar.scan(LocalStorage(), str(path), path.stat().st_size))
    assert [m.name for m in found] == names[:2]
    assert "damaged or cut-off header" in caplog.text


def test_not_a_tar_raises(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"\x89PNG not a tar at all" * 40)
    with pytest.raises(tarfile.ReadError):
        list(tar.scan(LocalStorage(), str(path), path.stat().st_size))
