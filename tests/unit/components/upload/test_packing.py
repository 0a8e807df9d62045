"""upload_dataset(layout="packed") against the real GCS emulator: shards, indexes, manifest."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from components.upload.packing import Packer
from components.upload.upload import upload_dataset
from tests.support.helpers import jpeg_bytes, write_images
from worker.archives.packed import Manifest, ShardIndex, UnsafeMemberError, crc32c


def _objects(gcs, bucket, prefix="ds/packed/"):
    """name -> (generation, bytes) of every object under the prefix."""
    return {
        b.name: (b.generation, b.download_as_bytes()) for b in gcs.client.list_blobs(bucket, prefix=prefix)
    }


def test_pack_writes_webdataset_shards_with_indexes_and_a_manifest(gcs, tmp_path):
    bucket = gcs.new_bucket("pack")
    src = tmp_path / "src"
    paths = write_images(src, 7)
    (src / "README.txt").write_text("packed too: the worker decides what is an image\n")
    report = upload_dataset(str(src), f"gs://{bucket}/ds", layout="packed", shard_files=3)
    assert (report.layout, report.uploaded, report.skipped, report.shards_written) == ("packed", 8, 0, 3)
    objects = _objects(gcs, bucket)
    manifest = Manifest.decode(objects["ds/packed/manifest.json"][1])
    assert [s.shard for s in manifest.shards] == [
        f"shard-00000{i}.tar" for i in range(3)
    ] and not manifest.bad
    expected = {p.relative_to(src).as_posix(): p.read_bytes() for p in [*paths, src / "README.txt"]}
    seen = {}
    for record in manifest.shards:
        data = objects[f"ds/packed/{record.shard}"][1]
        index = ShardIndex.decode(objects[f"ds/packed/{record.index}"][1])
        assert (index.size, index.crc32c, len(data)) == (record.size, crc32c(data), record.size)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # any tar reader takes a shard
            members = tf.getmembers()
            assert [m.name for m in members] == [e.name for e in index.members]
            for m, e in zip(members, index.members, strict=True):
                payload = tf.extractfile(m).read()
                assert (m.offset_data, m.size, crc32c(payload)) == (e.offset, e.size, e.crc32c)
                seen[m.name] = payload
    assert seen == expected


def test_a_rerun_writes_nothing_and_an_added_image_lands_in_one_new_shard(gcs, tmp_path):
    bucket = gcs.new_bucket("append")
    src = tmp_path / "src"
    write_images(src, 6)
    dest = f"gs://{bucket}/ds"
    upload_dataset(str(src), dest, layout="packed", shard_files=4)
    before = _objects(gcs, bucket)
    again = upload_dataset(str(src), dest, layout="packed", shard_files=4)
    assert (again.uploaded, again.skipped, again.shards_written) == (0, 6, 0)
    assert _objects(gcs, bucket) == before  # not one object written, not even the manifest

    (src / "d9").mkdir()
    (src / "d9" / "new.jpg").write_bytes(jpeg_bytes(99))
    (src / "d0" / "img_00000.jpg").write_bytes(jpeg_bytes(1000))  # changed at the source
    third = upload_dataset(str(src), dest, layout="packed", shard_files=4)
    assert (third.uploaded, third.skipped, third.shards_written) == (2, 5, 1)
    after = _objects(gcs, bucket)
    assert {k: v for k, v in after.items() if k in before and k != "ds/packed/manifest.json"} == {
        k: v for k, v in before.items() if k != "ds/packed/manifest.json"
    }
    assert sorted(set(after) - set(before)) == [
        "ds/packed/shard-000002.index.json",
        "ds/packed/shard-000002.tar",
    ]
    index = ShardIndex.decode(after["ds/packed/shard-000002.index.json"][1])
    assert [e.name for e in index.members] == ["d0/img_00000.jpg", "d9/new.jpg"]


def test_unsafe_member_names_are_refused_before_anything_is_written(gcs, tmp_path):
    bucket = gcs.new_bucket("unsafe")
    for name in ("src/ok.jpg", "src/../evil.jpg"):
        gcs.client.bucket(bucket).blob(name).upload_from_string(jpeg_bytes(1))
    before = gcs.object_names(bucket)
    with pytest.raises(UnsafeMemberError, match=r"'\.\./evil\.jpg'"):
        upload_dataset(f"gs://{bucket}/src", f"gs://{bucket}/ds", layout="packed")
    assert gcs.object_names(bucket) == before
    gcs.client.bucket(bucket).blob("src/../evil.jpg").delete()
    gcs.client.bucket(bucket).blob("src//abs.jpg").upload_from_string(jpeg_bytes(2))
    with pytest.raises(UnsafeMemberError, match="absolute"):
        upload_dataset(f"gs://{bucket}/src", f"gs://{bucket}/ds", layout="packed")
    assert gcs.object_names(bucket) == sorted(["src/ok.jpg", "src//abs.jpg"])


def test_unreadable_files_are_listed_in_the_manifest_and_the_rest_is_packed(gcs, tmp_path):
    bucket = gcs.new_bucket("bad")
    src = tmp_path / "src"
    paths = write_images(src, 3)

    class Source:
        def __init__(self, path):
            self.relpath, self.location = path.relative_to(src).as_posix(), str(path)
            self.size, self.crc32c = path.stat().st_size, None

    files = [Source(p) for p in paths]
    paths[1].unlink()  # gone between listing and reading
    report = Packer(f"gs://{bucket}/ds").pack(files)
    assert (report.packed, report.bad) == (2, 1)
    manifest = json.loads(_objects(gcs, bucket)["ds/packed/manifest.json"][1])
    assert manifest["members"] == 2
    assert manifest["bad_members"] == [
        {"name": files[1].relpath, "reason": manifest["bad_members"][0]["reason"]}
    ]
    assert "FileNotFoundError" in manifest["bad_members"][0]["reason"]


def test_shards_stay_under_their_size_and_a_big_file_gets_one_of_its_own(gcs, tmp_path):
    bucket = gcs.new_bucket("sizes")
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([3000, 3000, 3000, 9000, 1000]):
        (src / f"{i}.jpg").write_bytes(bytes([i]) * size)
    upload_dataset(str(src), f"gs://{bucket}/ds", layout="packed", shard_mb=0.0082)
    manifest = Manifest.decode(_objects(gcs, bucket)["ds/packed/manifest.json"][1])
    assert [s.members for s in manifest.shards] == [2, 1, 1, 1]
    assert all(s.size <= 8200 for s in manifest.shards if s.members > 1)


def test_an_interrupted_upload_is_adopted_not_packed_again(gcs, tmp_path):
    bucket = gcs.new_bucket("adopt")
    src = tmp_path / "src"
    write_images(src, 5)
    dest = f"gs://{bucket}/ds"
    upload_dataset(str(src), dest, layout="packed", shard_files=3)
    # As if the upload had died after its shards and indexes, before its manifest.
    gcs.client.bucket(bucket).blob("ds/packed/manifest.json").delete()
    shards = _objects(gcs, bucket)
    again = upload_dataset(str(src), dest, layout="packed", shard_files=3)
    assert (again.uploaded, again.skipped, again.shards_written) == (0, 5, 0)
    after = _objects(gcs, bucket)
    manifest = Manifest.decode(after.pop("ds/packed/manifest.json")[1])
    assert after == shards and [s.shard for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar"]
