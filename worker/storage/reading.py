"""The thread-pool batch reader (local files, composed GCS reads) and the backoff GCS asks for."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from worker.storage import ObjectInfo, ReadError, ReadStats


class ThreadedReader:
    """A batch reader over a blocking ``read_many``, one batch per pool thread."""

    def __init__(
        self,
        read_many: Callable[[Sequence[ObjectInfo]], list],
        threads: int,
        stats: ReadStats,
        requests_of: Callable[[Sequence[ObjectInfo]], int] = len,
    ):
        self.stats = stats
        self._read_many = read_many
        self._requests_of = requests_of
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="read")

    def _read(self, objects: Sequence[ObjectInfo]) -> list:
        payloads = self._read_many(objects)
        self.stats.add(
            objects=len(objects),
            nbytes=sum(len(p) for p in payloads if not isinstance(p, ReadError)),
            requests=self._requests_of(objects),
        )
        return payloads

    def submit(self, objects: Sequence[ObjectInfo]) -> Future:
        return self._pool.submit(self._read, objects)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def backoff_delays(initial: float = 0.1, maximum: float = 32.0, multiplier: float = 2.0):
    """Exponential backoff with full jitter, as GCS asks: the n-th wait is uniform in
    [0, min(maximum, initial * multiplier**n)].
    """
    ceiling = initial
    while True:
        yield random.uniform(0, ceiling)
        ceiling = min(maximum, ceiling * multiplier)
