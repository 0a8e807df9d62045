"""Coalesced ranged reads of archive members, and what becomes a read error."""

from __future__ import annotations

import pytest

from worker.archives import members as m
from worker.archives.packed import crc32c
from worker.storage import Member, ObjectInfo, ReadError, ReadSettings, ReadStats
from worker.storage.local import LocalStorage


class CountingStorage(LocalStorage):
    """The local backend, counting the ranged reads it serves."""

    def __init__(self):
        super().__init__()
        self.ranges: list[tuple[str, int, int]] = []

    def read_range(self, uri, offset, length):
        self.ranges.append((uri, offset, length))
        return super().read_range(uri, offset, length)


def _archive(tmp_path, name="a.bin", sizes=(100, 200, 300, 400), gap=512):
    """An archive-like file of members with ``gap`` bytes before each; returns (path, entries, payloads)."""
    data, entries, payloads = bytearray(), [], []
    for i, size in enumerate(sizes):
        data += b"\0" * gap
        payload = bytes([i + 1]) * size
        uri = f"gs://b/ds/img{i}.jpg"
        entries.append(ObjectInfo(uri, size, None, crc32c(payload), Member(str(tmp_path / name), len(data))))
        payloads.append(payload)
        data += payload
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path, entries, payloads


def test_neighbours_share_one_request_and_come_back_in_the_batch_order(tmp_path):
    _, entries, payloads = _archive(tmp_path)
    storage = CountingStorage()
    order = [2, 0, 3, 1]
    stats = ReadStats()
    got = m.read_members(storage, [entries[i] for i in order], stats)
    assert got == [payloads[i] for i in order]
    assert len(storage.ranges) == 1 == stats.requests
    assert stats.bytes == storage.ranges[0][2] == entries[3].member.offset + 400 - entries[0].member.offset


def test_far_apart_members_and_other_archives_are_separate_requests(tmp_path):
    _, near, _ = _archive(tmp_path, "near.bin", gap=512)
    _, far, _ = _archive(tmp_path, "far.bin", gap=5000)
    spans = m.coalesce(near + far, max_gap=1024)
    assert [(s.archive.rsplit("/", 1)[-1], len(s.indices)) for s in spans] == [("far.bin", 1)] * 4 + [
        ("near.bin", 4)
    ]
    # Members at [512, 612), [1124, 1324), [1836, 2136), [2648, 3048): the first three fit in 1700 bytes.
    assert [s.indices for s in m.coalesce(near, max_span=1700)] == [[0, 1, 2], [3]]


def test_a_truncated_archive_fails_only_the_members_past_its_end(tmp_path):
    path, entries, payloads = _archive(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: entries[2].member.offset + 10])
    got = m.read_members(LocalStorage(), entries)
    assert got[:2] == payloads[:2]
    for error in got[2:]:
        assert isinstance(error, ReadError) and "truncated" in str(error) and str(path) in str(error)


def test_a_corrupt_member_fails_its_checksum(tmp_path):
    path, entries, payloads = _archive(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[entries[1].member.offset + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    got = m.read_members(LocalStorage(), entries)
    assert isinstance(got[1], ReadError) and "CRC32C" in str(got[1])
    assert [got[0], got[2], got[3]] == [payloads[0], payloads[2], payloads[3]]


def test_missing_archive_unpacked_and_loose_objects_in_one_batch(tmp_path):
    _, entries, payloads = _archive(tmp_path)
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(b"loose bytes")
    gone = ObjectInfo("gs://b/ds/gone.jpg", 10, member=Member(str(tmp_path / "missing.tar"), 0))
    unpacked = ObjectInfo(
        "gs://b/ds/bad.jpg", 0, member=Member("gs://b/ds/packed/manifest.json", 0, m.UNPACKED)
    )
    damaged = ObjectInfo("gs://b/x.tar", 0, member=Member("gs://b/x.tar", 0, m.DAMAGED))
    batch = [entries[0], gone, ObjectInfo(str(loose), 11), unpacked, damaged]
    got = m.read_members(LocalStorage(), batch)
    assert got[0] == payloads[0] and got[2] == b"loose bytes"
    assert isinstance(got[1], ReadError) and "missing.tar" in str(got[1])
    assert isinstance(got[3], ReadError) and "could not be read when it was packed" in str(got[3])
    assert isinstance(got[4], ReadError) and "could not be listed" in str(got[4])


@pytest.mark.parametrize("gap", [0, 512])
def test_an_unchecked_member_is_returned_as_read(tmp_path, gap):
    _, entries, payloads = _archive(tmp_path, gap=gap)
    unchecked = [e._replace(crc32c=None) for e in entries]
    assert m.read_members(LocalStorage(), unchecked) == payloads


def test_a_long_span_is_read_as_parallel_pieces_cut_between_members(tmp_path, monkeypatch):
    sizes = [1000 + 37 * i for i in range(40)]
    _, entries, payloads = _archive(tmp_path, sizes=sizes, gap=512)
    (span,) = m.coalesce(entries)
    piece = (span.stop - span.start) // 3
    pieces = m.split(span, entries, piece=piece)
    assert len(pieces) == 3
    assert [i for p in pieces for i in p.indices] == span.indices  # each member once, in order
    for p in pieces:
        assert p.start == entries[p.indices[0]].member.offset
        assert p.stop == entries[p.indices[-1]].member.offset + entries[p.indices[-1]].size
    # Through the reader: the same bytes, one request per piece, sent at once.
    monkeypatch.setattr(m, "PIECE", piece)
    storage = CountingStorage()
    settings = ReadSettings(concurrency=500, threads=2, batches_ahead=1)
    reader = m.MemberReader(storage, settings, ReadStats())
    try:
        assert reader.submit(entries).result() == payloads
    finally:
        reader.close()
    assert len(storage.ranges) == len(pieces) == reader.stats.requests


def test_requests_in_flight_follow_rate_times_latency_within_the_read_ahead_bound():
    small = ReadSettings(concurrency=10, threads=4, batches_ahead=1, read_ahead_bytes=256 << 20)
    assert m.requests_in_flight(small, member_bytes=70_000) == 4  # never fewer than the threads
    wide = ReadSettings(concurrency=500, threads=4, read_ahead_bytes=256 << 20)
    assert m.requests_in_flight(wide, member_bytes=70_000) == -(-2 * 500 * 70_000 // m.PIECE)
    tight = ReadSettings(concurrency=5000, threads=4, read_ahead_bytes=64 << 20)
    assert m.requests_in_flight(tight, member_bytes=70_000) == (64 << 20) // m.PIECE


def test_requests_in_flight_cover_every_piece_of_the_batches_read_ahead():
    settings = ReadSettings(concurrency=100, threads=4, batches_ahead=8, read_ahead_bytes=256 << 20)
    by_rate = m.requests_in_flight(settings, member_bytes=70_000)
    assert m.requests_in_flight(settings, member_bytes=70_000, batch_pieces=3) == 24 > by_rate
    bounded = ReadSettings(concurrency=100, threads=4, batches_ahead=8, read_ahead_bytes=64 << 20)
    assert m.requests_in_flight(bounded, member_bytes=70_000, batch_pieces=3) == (64 << 20) // m.PIECE
