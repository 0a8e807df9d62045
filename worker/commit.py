"""Stage 5 — commit: one CSV part per shard, written atomically; the part's existence marks the shard done."""

from __future__ import annotations

import json
import logging
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
