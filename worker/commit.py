"""Stage 5 — commit: one CSV part per shard, written atomically; the part's existence marks the shard done."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from worker.results import (
    ERROR_COLUMNS,
    ERRORS_DIR,
    PART_COLUMNS,
    PARTS_DIR,
    SUMMARY_DIR,
    encode_rows,
    part_name,
    shard_of,
    summary_name,
)
from worker.storage import folder, join, open_storage

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    rows: list[tuple] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


class Committer:
    def __init__(self, output: str, project: str | None = None):
        self.output = output
        self.storage = open_storage(output, project=project)

    def committed_shards(self) -> set[int]:
        """Shards whose part already exists: one listing, not one request per shard."""
        prefix = folder(join(self.output, PARTS_DIR))
        try:
            shards = {shard_of(o.uri[len(prefix) :]) for o in self.storage.list(prefix)}
        except FileNotFoundError:
            return set()
        shards.discard(None)
        return shards

    def discard_interrupted_writes(self) -> None:
        """Clean up after a killed attempt; call before any rank of this run writes."""
        if removed := self.storage.discard_interrupted_writes(self.output):
            log.info("removed %d unfinished write(s) left by an interrupted attempt", removed)

    def commit(self, shard_index: int, result: ShardResult) -> bool:
        """Write the shard's errors, then its part. False if another writer committed it first."""
        name = part_name(shard_index)
        errors_uri = join(self.output, ERRORS_DIR, name)
        # Errors go first and are overwritten, so a crashed attempt's stale error rows
        # are replaced; the part, written last and only if absent, is the commit point.
        if result.errors or self.storage.exists(errors_uri):
            self.storage.write(errors_uri, encode_rows(ERROR_COLUMNS, result.errors))
        won = self.storage.write(
            join(self.output, PARTS_DIR, name), encode_rows(PART_COLUMNS, result.rows), if_absent=True
        )
        if not won:
            log.warning("shard %d was already committed by another writer; keeping theirs", shard_index)
        return won

    def write_summary(self, rank: int, summary: dict) -> None:
        uri = join(self.output, SUMMARY_DIR, summary_name(rank))
        self.storage.write(uri, json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"))


class Progress:
    """Images done, img/s and ETA, logged at a steady interval."""

    def __init__(self, rank: int, total: int, interval: float, clock=time.monotonic):
        self.rank = rank
        self.total = total
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self.last_log = self.start
        self.done = 0
        self.errors = 0

    def update(self, images: int, errors: int) -> None:
        self.done += images
        self.errors += errors
        now = self.clock()
        if now - self.last_log >= self.interval:
            self.last_log = now
            log.info("%s", self.line())

    @property
    def seconds(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        remaining = max(self.total - self.done, 0)
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        # With dynamic assignment the total is an estimate (the job's share per rank): a fast
        # rank may pass it, so the percentage stops at 100.
        pct = min(100.0, 100.0 * self.done / self.total) if self.total else 100.0
        return (
            f"rank {self.rank}: {self.done}/{self.total} images ({pct:.1f}%), "
            f"{self.errors} errors, {rate:.1f} img/s, ETA {eta}"
        )
