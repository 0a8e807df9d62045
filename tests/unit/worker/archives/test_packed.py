"""The packed layout's names, codecs and member-name check."""

from __future__ import annotations

import pytest

from worker.archives import packed


@pytest.mark.parametrize(
    "name",
    [
        "../evil.jpg",
        "a/../../evil.jpg",
        "/etc/passwd",
        "\\evil.jpg",
        "C:evil.jpg",
        "a//b.jpg",
        "./a.jpg",
        "a\\b.jpg",
        "",
        "a\0.jpg",
    ],
)
def test_unsafe_member_names_are_refused(name):
    with pytest.raises(packed.UnsafeMemberError):
        packed.check_member_name(name)


@pytest.mark.parametrize("name", ["a.jpg", "d0/img_00001.jpg", "ünï/cödé.png", "a..b/c.jpg", ".hidden/x.jpg"])
def test_plain_relative_names_pass(name):
    packed.check_member_name(name)


def test_crc32c_is_written_as_gcs_writes_it():
    # The CRC32C check value of "123456789" is 0xE3069283; GCS reports base64 of its big-endian bytes.
    assert packed.crc32c(b"123456789") == "4waSgw=="


def test_index_and_manifest_round_trip():
    index = packed.ShardIndex(
        "shard-000003.tar", 4096, "AAAAAA==", [packed.IndexEntry("d/ü.jpg", 1024, 7, "4waSgw==")]
    )
    assert packed.ShardIndex.decode(index.encode()) == index
    manifest = packed.Manifest(
        [packed.ShardRecord("shard-000003.tar", "shard-000003.index.json", 1, 4096)],
        [packed.BadMember("x.jpg", "PermissionError: denied")],
    )
    assert packed.Manifest.decode(manifest.encode()) == manifest
    assert (
        packed.shard_number(packed.shard_name(3)) == 3 and packed.shard_number(packed.index_name(3)) is None
    )


def test_a_newer_or_foreign_format_is_refused():
    with pytest.raises(ValueError, match="version"):
        packed.Manifest.decode(b'{"format": "kfp-batch-inference/packed", "version": 99, "shards": []}')
    with pytest.raises(ValueError, match="format"):
        packed.ShardIndex.decode(b'{"format": "something-else"}')
