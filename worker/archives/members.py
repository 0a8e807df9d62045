"""Read a batch of archive members with a few ranged GETs: contiguous members share one request.

A batch's members are grouped by archive and sorted by offset; neighbours whose gap is at most
``max_gap`` bytes (tar headers, members that are not planned) join one span of at most
``max_span`` bytes, and each span is one ``read_range``. Every member's bytes are then cut from
its span and checked: a tar member against the CRC32C its shard's index recorded, a zip member
against its CRC-32. What cannot be read becomes a ``ReadError`` in that member's place (a span
that fails fails only its members; an archive shorter than its index fails the members past
its end), so the batch always comes back whole, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from worker.archives import zip as zip_format
from worker.archives.packed import crc32c
from worker.storage import ObjectInfo, ReadError, ReadStats, Storage

# Reading this many unplanned bytes costs less than one more request (tens of ms on GCS).
MAX_GAP = 1 << 20
# Large enough that a GPU batch of ~70 KB JPEGs is one request; small enough to bound memory.
MAX_SPAN = 64 << 20

# Member formats (``worker.storage.Member.format``): the bytes are the image; a zip local record;
# a file the upload could not read, so no archive holds it; an archive the plan could not list.
TAR, ZIP, UNPACKED, DAMAGED = "tar", "zip", "unpacked", "damaged"
_NOT_READ = {
    UNPACKED: "not in the packed dataset: it could not be read when it was packed ({} says why)",
    DAMAGED: "{} could not be listed as an archive when the run was planned (the plan's log says why)",
}


@dataclass
class Span:
    """One ranged read: ``[start, stop)`` of ``archive``, covering the batch's members at ``indices``."""

    archive: str
    start: int
    stop: int
    indices: list[int] = field(default_factory=list)


def coalesce(objects: Sequence[ObjectInfo], max_gap: int = MAX_GAP, max_span: int = MAX_SPAN) -> list[Span]:
    """The ranged reads that cover every member of ``objects`` that lies in an archive."""
    located = sorted(
        (o.member.archive, o.member.offset, o.member.offset + o.size, i)
        for i, o in enumerate(objects)
        if o.member is not None and o.member.format not in _NOT_READ
    )
    spans: list[Span] = []
    for archive, start, stop, i in located:
        last = spans[-1] if spans else None
        if (
            last is not None
            and last.archive == archive
            and start - last.stop <= max_gap
            and max(stop, last.stop) - last.start <= max_span
        ):
            last.stop = max(last.stop, stop)
        else:
            last = Span(archive, start, stop)
            spans.append(last)
        last.indices.append(i)
    return spans


class MemberReader:
    """The read stage's batch reader (``worker.storage.BatchReader``) for a plan of archive
    members: each batch's ranged reads in a pool thread, counted in ``stats`` as they are sent.
    """

    def __init__(self, storage: Storage, threads: int, stats: ReadStats):
        self.storage = storage
        self.stats = stats
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="read-members")

    def submit(self, objects: Sequence[ObjectInfo]) -> Future:
        return self._pool.submit(read_members, self.storage, objects, self.stats)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def read_members(
    storage: Storage, objects: Sequence[ObjectInfo], stats: ReadStats | None = None
) -> list[bytes | ReadError]:
    """The bytes of every object, in order: archive members by coalesced ranged reads, any object
    of its own through ``storage.read_many``. ``stats`` counts the objects, requests and bytes.
    """
    out: list = [None] * len(objects)
    loose = [i for i, o in enumerate(objects) if o.member is None]
    if loose:
        got = storage.read_many([objects[i] for i in loose])
        for i, payload in zip(loose, got, strict=True):
            out[i] = payload
    for i, o in enumerate(objects):
        if o.member is not None and o.member.format in _NOT_READ:
            out[i] = ReadError(_NOT_READ[o.member.format].format(o.member.archive))
    spans = coalesce(objects)
    nbytes = 0
    for span in spans:
        try:
            data = memoryview(storage.read_range(span.archive, span.start, span.stop - span.start))
        except Exception as exc:  # a failed span fails its members, never the batch
            reason = ReadError(f"read failed: {span.archive}: {type(exc).__name__}: {exc}")
            for i in span.indices:
                out[i] = reason
            continue
        nbytes += len(data)
        for i in span.indices:
            out[i] = _member_bytes(objects[i], data, span)
    if stats is not None:
        stats.add(objects=len(objects), nbytes=nbytes, requests=len(spans) + len(loose))
    return out


def _member_bytes(obj: ObjectInfo, data: memoryview, span: Span) -> bytes | ReadError:
    at = obj.member.offset - span.start
    piece = data[at : at + obj.size]
    if len(piece) < obj.size:
        return ReadError(
            f"{span.archive} ends at byte {span.start + len(data):,}, before this member's end at byte "
            f"{obj.member.offset + obj.size:,}: the archive is truncated or changed since it was indexed"
        )
    if obj.member.format == ZIP:
        try:
            return zip_format.extract(piece)
        except ValueError as exc:
            return ReadError(f"{span.archive}: {exc}")
    payload = bytes(piece)
    if obj.crc32c and crc32c(payload) != obj.crc32c:
        return ReadError(
            f"{span.archive}: the member's CRC32C does not match its shard index (corrupt member)"
        )
    return payload
