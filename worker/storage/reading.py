"""What every backend's batch reader shares: its settings, its counters, and the thread-pool reader.

A batch reader takes a batch of objects and returns a future of their bytes, in order; an
object that could not be read is a ``ReadError`` in its place, never a missing entry. The
read stage (``worker.read``) keeps a bounded window of batches submitted ahead of the compute.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from worker.storage import ObjectInfo, ReadError

Payload = "bytes | memoryview | ReadError"


@dataclass(frozen=True)
class ReadSettings:
    """How a rank reads its input.

    Attributes:
        concurrency: Requests in flight at once (object stores).
        read_ahead_bytes: Planned bytes submitted but not yet consumed: the memory bound.
        batches_ahead: Batches submitted ahead at least (within ``read_ahead_bytes``).
        threads: Threads of the thread-pool readers (local files, composed GCS reads).
        rate_limit: Most requests per second to one bucket from this rank; 0: no limit.
        retry_deadline: Seconds a request is retried (429, 5xx, dropped connections) before it
            becomes a read error.
    """

    concurrency: int = 500
    read_ahead_bytes: int = 256 << 20
    batches_ahead: int = 8
    threads: int = 4
    rate_limit: float = 0.0
    retry_deadline: float = 300.0


class ReadStats:
    """A rank's read counters: objects, bytes, requests sent and retries, from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.objects = 0
        self.bytes = 0
        self.requests = 0
        self.retries = 0
        self._lock = threading.Lock()

    def add(self, *, objects: int = 0, nbytes: int = 0, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.objects += objects
            self.bytes += nbytes
            self.requests += requests
            self.retries += retries

    def count_retry(self, _exc: BaseException | None = None) -> None:
        """An ``on_error`` callback for google-api-core's Retry: one more retry."""
        self.add(retries=1)

    def rates(self) -> tuple[float, float]:
        """Reads (requests) and retries per second since the start."""
        seconds = max(self.clock() - self.started, 1e-9)
        return self.requests / seconds, self.retries / seconds

    def line(self) -> str:
        reads, retries = self.rates()
        return f"{reads:.0f} reads/s, {retries:.1f} retries/s"

    def summary(self, images: int) -> dict:
        """The rank summary's read figures."""
        return {
            "read_requests": self.requests,
            "read_retries": self.retries,
            "read_bytes": self.bytes,
            "requests_per_image": round(self.requests / images, 4) if images else 0.0,
        }


class BatchReader(Protocol):
    stats: ReadStats

    def submit(self, objects: Sequence[ObjectInfo]) -> Future:
        """A future of the objects' payloads (bytes-like or ``ReadError``), in order."""
        ...

    def close(self) -> None: ...


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
