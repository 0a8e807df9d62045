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

import math
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from worker.archives import zip as zip_format
from worker.archives.packed import crc32c
from worker.storage import ObjectInfo, ReadError, ReadSettings, ReadStats, Storage

# Reading this many unplanned bytes costs less than one more request (tens of ms on GCS).
MAX_GAP = 1 << 20
# Large enough that a GPU batch of ~70 KB JPEGs is one span; small enough to bound memory.
MAX_SPAN = 64 << 20
# A span is read as parallel pieces of about this size, cut at member boundaries: one stream from
# GCS (or the emulator) delivers a fraction of what several do, and pieces this large keep a batch
# of 256 ~70 KB members at two requests (under 0.01 per image).
PIECE = 8 << 20

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


def split(span: Span, objects: Sequence[ObjectInfo], piece: int = PIECE) -> list[Span]:
    """``span`` as ``len // piece`` (at least one) ranged reads of about equal size, cut between members."""
    n = max(1, (span.stop - span.start) // piece)
    if n == 1:
        return [span]
    target = (span.stop - span.start) / n
    pieces = [Span(span.archive, span.start, span.start)]
    for i in span.indices:
        start = objects[i].member.offset
        stop = start + objects[i].size
        last = pieces[-1]
        if last.indices and len(pieces) < n and start - span.start >= len(pieces) * target:
            last = Span(span.archive, start, start)
            pieces.append(last)
        last.indices.append(i)
        last.stop = max(last.stop, stop)
    return pieces


def requests_in_flight(settings: ReadSettings, member_bytes: float, batch_pieces: int = 1) -> int:
    """Ranged reads in flight: enough for every piece of the batches read ahead
    (``batches_ahead`` x ``batch_pieces``) and for the bytes of twice the loose reads' rate x
    latency (``concurrency`` members; twice, as the read window keeps, since a piece's transfer
    adds to its latency); at least ``threads``, at most the read-ahead bound. More only contends
    for the CPU.
    """
    wanted = max(
        math.ceil(2 * settings.concurrency * member_bytes / PIECE), settings.batches_ahead * batch_pieces
    )
    return max(1, settings.threads, min(wanted, settings.read_ahead_bytes // PIECE))


class MemberReader:
    """The read stage's batch reader (``worker.storage.BatchReader``) for a plan of archive
    members: each batch in a pool thread, its spans' pieces as ranged reads in parallel
    (``requests_in_flight``, sized by the first batch's members), counted in ``stats`` as they
    are sent.
    """

    def __init__(self, storage: Storage, settings: ReadSettings, stats: ReadStats):
        self.storage = storage
        self.settings = settings
        self.stats = stats
        self._batches = ThreadPoolExecutor(
            max(1, settings.threads, settings.batches_ahead), thread_name_prefix="read-members"
        )
        self._ranges: ThreadPoolExecutor | None = None

    def submit(self, objects: Sequence[ObjectInfo]) -> Future:
        if self._ranges is None:
            batch_bytes = sum(o.size for o in objects)
            member_bytes = batch_bytes / max(1, len(objects))
            threads = requests_in_flight(self.settings, member_bytes, max(1, batch_bytes // PIECE))
            self._ranges = ThreadPoolExecutor(threads, thread_name_prefix="read-ranges")
        return self._batches.submit(read_members, self.storage, objects, self.stats, self._ranges)

    def close(self) -> None:
        self._batches.shutdown(wait=True, cancel_futures=True)
        if self._ranges is not None:
            self._ranges.shutdown(wait=True, cancel_futures=True)


def read_members(
    storage: Storage,
    objects: Sequence[ObjectInfo],
    stats: ReadStats | None = None,
    ranges: Executor | None = None,
) -> list[bytes | ReadError]:
    """The bytes of every object, in order: archive members by coalesced ranged reads (in
    ``ranges``, in parallel, where given), any object of its own through ``storage.read_many``.
    ``stats`` counts the objects, requests and bytes.
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
    spans = [piece for span in coalesce(objects) for piece in split(span, objects, PIECE)]

    def read(span: Span) -> bytes | memoryview:
        return storage.read_range(span.archive, span.start, span.stop - span.start)

    reads = [ranges.submit(read, span) for span in spans] if ranges is not None else None
    nbytes = 0
    for n, span in enumerate(spans):
        try:
            data = memoryview(reads[n].result() if reads is not None else read(span))
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
    payload = bytes(piece)  # google_crc32c takes bytes only
    if obj.crc32c and crc32c(payload) != obj.crc32c:
        return ReadError(
            f"{span.archive}: the member's CRC32C does not match its shard index (corrupt member)"
        )
    return payload
