"""Planning from archives: the packed layout, a user's tar shards, a zip read in place."""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass

import pytest

from components.upload.packing import Packer
from tests.support.helpers import jpeg_bytes
from worker.archives.members import read_members
from worker.config import WorkerConfig
from worker.plan import list_input
from worker.storage import open_storage


@dataclass
class Source:
    relpath: str
    location: str
    size: int
    crc32c: str | None = None


def _sources(root, names):
    out = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(i))
        out.append(Source(name, str(path), path.stat().st_size))
    return out


def _cfg(input_uri, tmp_path, **kw):
    return WorkerConfig(input=input_uri, output=str(tmp_path / "out"), model="m", **kw)


def _read(entries):
    got = read_members(open_storage(entries[0].uri), entries)
    assert all(isinstance(p, bytes) for p in got), got
    return got


def test_packed_dataset_is_planned_from_its_manifest_and_indexes(gcs, tmp_path):
    bucket = gcs.new_bucket("listing")
    dataset = f"gs://{bucket}/ds"
    names = ["b/2.jpg", "a/1.jpg", "notes.txt", "c/3.png"]
    files = _sources(tmp_path / "src", names)
    Packer(dataset, shard_files=2).pack(files + [Source("gone.jpg", str(tmp_path / "gone.jpg"), 5)])
    entries = list_input(_cfg(dataset, tmp_path)).sorted()
    # Images only, by shard and offset (the packer writes names in order); the unreadable one last.
    assert [e.uri for e in entries] == [
        f"{dataset}/{n}" for n in ("a/1.jpg", "b/2.jpg", "c/3.png", "gone.jpg")
    ]
    assert [e.member.archive.rsplit("/", 1)[-1] for e in entries[:3]] == ["shard-000000.tar"] * 2 + [
        "shard-000001.tar"
    ]
    assert len({e.generation for e in entries[:3]}) == 2  # each shard's generation
    assert entries[3].member.format == "unpacked"
    by_name = {f.relpath: (tmp_path / "src" / f.relpath).read_bytes() for f in files}
    assert _read(entries[:3]) == [by_name[n] for n in ("a/1.jpg", "b/2.jpg", "c/3.png")]
    # The loose layout ignores the shards; an explicit packed layout needs a manifest.
    assert list_input(_cfg(dataset, tmp_path, input_layout="loose")).sorted() == []
    with pytest.raises(FileNotFoundError, match="no gs://.*manifest.json"):
        list_input(_cfg(f"gs://{bucket}/elsewhere", tmp_path, input_layout="packed")).sorted()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_without_loose_images_are_read_in_auto(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    first = {"./000.jpg": jpeg_bytes(0), "000.cls": b"3", "001.jpg": jpeg_bytes(1)}
    _tar(shards / "shard-000.tar", first)
    _tar(shards / "shard-001.tar", {"002.png": jpeg_bytes(2), "002.json": b"{}"})
    (shards / "README.md").write_text("other files are ignored")
    entries = list_input(_cfg(str(shards), tmp_path)).sorted()
    assert [e.uri for e in entries] == [
        f"{shards}/shard-000.tar/000.jpg",
        f"{shards}/shard-000.tar/001.jpg",
        f"{shards}/shard-001.tar/002.png",
    ]
    assert _read(entries) == [jpeg_bytes(0), jpeg_bytes(1), jpeg_bytes(2)]
    # A loose image beside them makes the input loose, unless the layout says tar.
    (shards / "loose.jpg").write_bytes(jpeg_bytes(9))
    assert [e.uri for e in list_input(_cfg(str(shards), tmp_path)).sorted()] == [f"{shards}/loose.jpg"]
    assert len(list_input(_cfg(str(shards), tmp_path, input_layout="tar")).sorted()) == 3
    # One tar named as the input.
    assert len(list_input(_cfg(str(shards / "shard-001.tar"), tmp_path)).sorted()) == 1


def test_a_zip_named_as_the_input_is_read_in_place_on_gcs(gcs, tmp_path):
    bucket = gcs.new_bucket("zip")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.mkdir("val2017")
        for i in range(5):
            zf.writestr(f"val2017/{i:012d}.jpg", jpeg_bytes(i))
        zf.writestr("annotations.json", b"{}")
    gcs.client.bucket(bucket).blob("coco/val2017.zip").upload_from_string(buf.getvalue())
    uri = f"gs://{bucket}/coco/val2017.zip"
    entries = list_input(_cfg(uri, tmp_path)).sorted()
    assert [e.uri for e in entries] == [f"{uri}/val2017/{i:012d}.jpg" for i in range(5)]
    assert {e.member.format for e in entries} == {"zip"} and entries[0].generation is not None
    assert _read(entries) == [jpeg_bytes(i) for i in range(5)]


def test_a_damaged_archive_is_one_planned_error_not_a_silent_loss(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    (shards / "broken.tar").write_bytes(b"\x89PNG" * 300)
    (entry,) = list_input(_cfg(str(shards), tmp_path)).sorted()
    assert entry.uri == str(shards / "broken.tar") and entry.member.format == "damaged"
