"""Stage 2 — read: fetch each batch's bytes ahead of the compute, within a bounded window.

The backend's batch reader (``worker.storage``) does the requests; this stage decides how far
ahead of the compute it reads: batches are submitted while the planned bytes of those not yet
consumed stay under ``read_ahead_bytes`` and their objects under what keeps ``concurrency``
requests busy, so memory stays flat on any dataset, and results come back in order.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from worker.archives.members import MemberReader
from worker.config import WorkerConfig
from worker.plan import Shard
from worker.prefetch import prefetch_map
from worker.storage import BatchReader, ObjectInfo, ReadError, ReadSettings, ReadStats, open_storage

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Batch:
    shard: Shard
    objects: list[ObjectInfo]
    last_in_shard: bool
    # Bytes-like (bytes, or a memoryview into the batch's buffer) or a ReadError, per object.
    payloads: list[bytes | memoryview | ReadError] | None = None


class ShardSource(Protocol):
    def objects(self, shard: int) -> list[ObjectInfo]:
        """The images of shard ``shard``, in plan order (``worker.plan_store.PlanReader``)."""
        ...


@dataclass(frozen=True)
class PlanInMemory:
    """A plan held as a list, read a shard at a time as ``batches`` reads one: for tools and
    benchmarks over inputs small enough to list in memory.
    """

    entries: Sequence[ObjectInfo]
    shard_size: int

    def objects(self, shard: int) -> list[ObjectInfo]:
        return list(self.entries[shard * self.shard_size : (shard + 1) * self.shard_size])


# Shards whose plan rows are read ahead of the batches: reading a shard's row group costs a
# request or two, which must not stall the read stage's submissions.
PLAN_SHARDS_AHEAD = 2


def batches(plan: ShardSource, shards: Iterable[Shard], batch_size: int) -> Iterator[Batch]:
    """The shards' batches, each shard's plan rows read (in a thread of its own) just ahead."""
    with ThreadPoolExecutor(1, thread_name_prefix="plan-read") as pool:
        shard_rows = prefetch_map(lambda s: (s, plan.objects(s.index)), shards, pool, PLAN_SHARDS_AHEAD)
        for shard, objects in shard_rows:
            for start in range(0, len(shard), batch_size):
                stop = min(start + batch_size, len(shard))
                yield Batch(shard, objects[start:stop], last_in_shard=stop == len(shard))


def read_settings(cfg: WorkerConfig, world_size: int) -> ReadSettings:
    """The rank's read settings: requests in flight = target rate x latency, unless set."""
    concurrency = cfg.read_concurrency or math.ceil(cfg.read_rate * cfg.read_latency)
    return ReadSettings(
        concurrency=max(1, concurrency),
        read_ahead_bytes=int(cfg.read_ahead_mb * (1 << 20)),
        batches_ahead=cfg.prefetch_batches,
        threads=cfg.read_threads,
        # The limit is the job's, per bucket: each rank keeps its share.
        rate_limit=cfg.bucket_read_limit / max(1, world_size),
        retry_deadline=cfg.retry_deadline,
    )


def open_reader(cfg: WorkerConfig, settings: ReadSettings, *, archived: bool = False) -> BatchReader:
    """The batch reader of the input's backend; for a plan of archive members (``archived``),
    one that reads each batch with ranged GETs over neighbouring members.
    """
    storage = open_storage(cfg.input, project=cfg.project, compose=cfg.compose)
    if archived:
        return MemberReader(storage, settings, ReadStats())
    return storage.reader(settings, ReadStats())


def read_batches(reader: BatchReader, work: Iterable[Batch], settings: ReadSettings) -> Iterator[Batch]:
    """The batches of ``work`` with their payloads, in order, read ahead within the window.

    ``work`` is pulled lazily (a generator that claims shards claims only as far as the window).
    """
    pending: collections.deque = collections.deque()
    ahead_bytes = ahead_objects = 0
    work = iter(work)
    exhausted = False
    while True:
        # Enough objects submitted to keep every request slot busy while the oldest batches are
        # consumed, and never more planned bytes than the bound (but always one batch).
        while not exhausted and (
            not pending
            or ahead_bytes < settings.read_ahead_bytes
            and (len(pending) < settings.batches_ahead or ahead_objects < 2 * settings.concurrency)
        ):
            batch = next(work, None)
            if batch is None:
                exhausted = True
                break
            size = sum(o.size for o in batch.objects)
            pending.append((batch, reader.submit(batch.objects), size))
            ahead_bytes += size
            ahead_objects += len(batch.objects)
        if not pending:
            return
        batch, future, size = pending.popleft()
        batch.payloads = future.result()
        ahead_bytes -= size
        ahead_objects -= len(batch.objects)
        yield batch
