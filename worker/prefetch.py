"""An ordered map that runs a bounded number of calls ahead of its consumer."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], pool: Executor, depth: int) -> Iterator[R]:
    """``map(fn, items)`` with up to ``depth`` calls running ahead in ``pool``, results in order.

    ``items`` is pulled lazily, so a generator that claims work (dynamic shard
    assignment) claims at most ``depth`` batches ahead of the consumer, and the results held
    at once are at most ``depth``, however many items there are.
    """
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
