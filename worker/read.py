"""Stage 2 — read: fetch each batch's bytes in background threads, ahead of the compute."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from worker.archives.members import read_members
from worker.plan import Shard
from worker.storage import ObjectInfo, ReadError, Storage

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Batch:
    shard: Shard
    objects: list[ObjectInfo]
    last_in_shard: bool
    payloads: list[bytes | ReadError] | None = None


def batches(plan: Sequence[ObjectInfo], shards: Iterable[Shard], batch_size: int) -> Iterator[Batch]:
    for shard in shards:
        for start in range(shard.start, shard.stop, batch_size):
            stop = min(start + batch_size, shard.stop)
            yield Batch(shard, plan[start:stop], last_in_shard=stop == shard.stop)


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], pool: Executor, depth: int) -> Iterator[R]:
    """``map(fn, items)`` with up to ``depth`` calls running ahead in ``pool``, results in order.

    ``items`` is pulled lazily, so a generator that claims work (dynamic shard
    assignment) claims at most ``depth`` batches ahead of the consumer.
    """
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def read_batches(storage: Storage, work: Iterable[Batch], pool: Executor, depth: int) -> Iterator[Batch]:
    def read(batch: Batch) -> Batch:
        # Images inside archives are read by ranged GETs over neighbouring members.
        batch.payloads = read_members(storage, batch.objects)
        return batch

    return prefetch_map(read, work, pool, depth)
