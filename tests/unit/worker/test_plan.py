"""Stage 1 without torchrun: the plan as a table of Parquet pieces, sorted on disk, read a shard at a time."""

from __future__ import annotations

import random

import pytest

from worker.plan_store import PlanReader, TableIndex, fetch_pieces, iter_table, shards_per_piece, write_table
from worker.storage import Member, ObjectInfo, join


def _write(prefix, tmp_path, pages, shard_size, *, ordered=False):
    return TableIndex.decode(write_table(prefix, pages, shard_size, ordered=ordered))


def test_a_listing_in_any_order_is_written_sorted_in_pieces_of_whole_shards(
    any_prefix, tmp_path, monkeypatch
):
    monkeypatch.setattr("worker.plan_store.PIECE_IMAGES", 40)  # several pieces from a few hundred images
    plan = [ObjectInfo(f"{any_prefix}/d{i % 7}/{i:04d}.jpg", i, None if i % 2 else i * 7) for i in range(301)]
    shuffled = plan[:]
    random.Random(3).shuffle(shuffled)
    pages = [shuffled[i : i + 50] for i in range(0, len(shuffled), 50)]
    index = _write(join(any_prefix, "plan"), tmp_path, pages, shard_size=8)
    expected = sorted(plan, key=lambda o: o.uri)
    assert index.images == 301 and index.shards_per_piece == shards_per_piece(8) == 5
    assert len(index.pieces) == -(-38 // 5) and sum(p["rows"] for p in index.pieces) == 301
    reader = PlanReader(join(any_prefix, "plan"), index)
    assert reader.shards == 38
    # Any shard alone, in any order, is its slice of the sorted plan.
    for shard in (37, 0, 11, 12, 5):
        assert reader.objects(shard) == expected[shard * 8 : shard * 8 + 8]
    with pytest.raises(IndexError):
        reader.objects(38)
    assert [o for page in iter_table(join(any_prefix, "plan"), index) for o in page] == expected


def test_archive_members_keep_their_listed_order_and_members(tmp_path):
    plan = [
        ObjectInfo(
            f"gs://b/ds/{i}.jpg",
            70 + i,
            17,
            "4waSgw==" if i % 2 else None,
            Member(f"gs://b/s{i // 3}.tar", 512 * i),
        )
        for i in range(7)
    ] + [
        ObjectInfo(
            "gs://b/ds/bad.jpg", 0, None, None, Member("gs://b/ds/packed/manifest.json", 0, "unpacked")
        )
    ]
    prefix = str(tmp_path / "plan")
    index = _write(prefix, tmp_path, [plan[:4], plan[4:]], shard_size=3, ordered=True)
    assert index.archived
    reader = PlanReader(prefix, index)
    assert [o for s in range(reader.shards) for o in reader.objects(s)] == plan


def test_any_uri_and_every_member_format_round_trip(tmp_path):
    plan = [
        ObjectInfo('gs://b/a "quoted"\\back.jpg', 10, 1700000000000001),
        ObjectInfo("gs://b/été/ß.jpg", 0),
        ObjectInfo("gs://b//lead/../x.png", 123456789),
    ]
    prefix = str(tmp_path / "plan")
    index = _write(prefix, tmp_path, [plan], shard_size=2)
    assert [o for page in iter_table(prefix, index) for o in page] == sorted(plan, key=lambda o: o.uri)
    members = [
        ObjectInfo("gs://b/v.zip/x.jpg", 90, 18, None, Member("gs://b/v.zip", 0, "zip")),
        ObjectInfo("gs://b/t.tar/y.jpg", 0, None, None, Member("gs://b/t.tar", 0, "damaged")),
    ]
    index = _write(str(tmp_path / "members"), tmp_path, [members], shard_size=2, ordered=True)
    assert PlanReader(str(tmp_path / "members"), index).objects(0) == members


def test_an_edited_piece_is_refused_by_its_digest(tmp_path):
    prefix = str(tmp_path / "plan")
    index = _write(prefix, tmp_path, [[ObjectInfo(f"/d/{i}.jpg", i) for i in range(10)]], shard_size=4)
    fetch_pieces(prefix, index, tmp_path / "copies")  # as written: accepted
    piece = tmp_path / "plan" / index.pieces[0]["name"]
    piece.write_bytes(piece.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="is not the piece"):
        fetch_pieces(prefix, index, tmp_path / "again")


def test_an_empty_listing_is_an_empty_plan(tmp_path):
    index = _write(str(tmp_path / "plan"), tmp_path, [], shard_size=4)
    assert index.images == 0 and index.pieces == () and PlanReader(str(tmp_path / "plan"), index).shards == 0
