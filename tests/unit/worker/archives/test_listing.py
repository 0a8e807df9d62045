"""Planning from archives: the packed layout, a user's tar shards, a zip read in place."""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass

import pytest

from components.upload.packing import Packer
from tests.support.helpers import jpeg_bytes
from worker.archives.listing import LISTING_THREADS, packed_pages
from worker.archives.members import read_members
from worker.config import WorkerConfig
from worker.plan import list_input, make_plan
from worker.plan_store import TableIndex, iter_table
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
    # Images only: the unreadable one first, then by shard and offset (the packer writes names in order).
    assert [e.uri for e in entries] == [
        f"{dataset}/{n}" for n in ("gone.jpg", "a/1.jpg", "b/2.jpg", "c/3.png")
    ]
    assert entries[0].member.format == "unpacked"
    assert [e.member.archive.rsplit("/", 1)[-1] for e in entries[1:]] == ["shard-000000.tar"] * 2 + [
        "shard-000001.tar"
    ]
    assert len({e.generation for e in entries[1:]}) == 2  # each shard's generation
    by_name = {f.relpath: (tmp_path / "src" / f.relpath).read_bytes() for f in files}
    assert _read(entries[1:]) == [by_name[n] for n in ("a/1.jpg", "b/2.jpg", "c/3.png")]
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


def test_a_name_packed_again_is_planned_once_from_its_latest_shard(tmp_path):
    """A file changed at the source, and one unreadable at the first upload, are packed again:
    each is planned once, from the shard that holds it last, through the plan's on-disk table.
    """
    dataset = str(tmp_path / "ds")
    files = _sources(tmp_path / "src", ["a.jpg", "b.jpg"])
    late = tmp_path / "src" / "late.jpg"
    Packer(dataset, shard_files=8).pack(files + [Source("late.jpg", str(late), 5)])
    (tmp_path / "src" / "b.jpg").write_bytes(jpeg_bytes(7) + b"changed")
    late.write_bytes(jpeg_bytes(8))
    files = [Source(f.relpath, f.location, (tmp_path / "src" / f.relpath).stat().st_size) for f in files]
    Packer(dataset, shard_files=8).pack(files + [Source("late.jpg", str(late), late.stat().st_size)])

    out = tmp_path / "out"
    index, _ = make_plan(_cfg(dataset, tmp_path, shard_size=2))
    plan = [o for page in iter_table(str(out / "plan"), TableIndex.decode(index)) for o in page]

    assert [o.uri for o in plan] == [f"{dataset}/{n}" for n in ("a.jpg", "b.jpg", "late.jpg")]
    assert [o.member.archive.rsplit("/", 1)[-1] for o in plan] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000001.tar",
    ]
    assert _read(plan[1:]) == [(tmp_path / "src" / n).read_bytes() for n in ("b.jpg", "late.jpg")]
    assert [o.uri for o in list_input(_cfg(dataset, tmp_path)).sorted()] == [o.uri for o in plan]


class _CountingReads:
    """A storage that counts the packed shard indexes read through it."""

    def __init__(self, storage):
        self.storage, self.index_reads = storage, 0

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def read(self, uri, *args, **kw):
        self.index_reads += uri.endswith(".index.json")
        return self.storage.read(uri, *args, **kw)


def test_packed_members_are_listed_a_bounded_window_of_shards_ahead(tmp_path):
    """Planning a packed dataset holds a few shards' members at a time, never the whole dataset's."""
    dataset = str(tmp_path / "ds")
    files = _sources(tmp_path / "src", [f"{i:03d}.jpg" for i in range(60)])
    Packer(dataset, shard_files=1).pack(files)
    storage = _CountingReads(open_storage(dataset))

    pages = packed_pages(storage, dataset)
    first = next(pages)

    assert [o.uri for o in first] == [f"{dataset}/000.jpg"]
    assert storage.index_reads <= 2 * LISTING_THREADS < 60
    assert sum(len(page) for page in pages) == 59 and storage.index_reads == 60
