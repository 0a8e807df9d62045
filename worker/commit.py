"""Stage 5 — commit: one CSV part per shard, written atomically; the part's existence marks the shard done."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from worker.storage import join, open_storage

log = logging.getLogger(__name__)

PART_COLUMNS = ("image_id", "classification", "label_index", "score", "uri")
ERROR_COLUMNS = ("uri", "reason")
_PART_NAME = re.compile(r"part-(\d+)\.csv$")


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:05d}.csv"


def image_id(uri: str) -> str:
    """The object's stem, as the reference system writes it."""
    return PurePosixPath(uri.rsplit("/", 1)[-1]).stem


@dataclass
class ShardResult:
    rows: list[tuple] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def _csv_bytes(header: tuple[str, ...], rows: list[tuple]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


class Committer:
    def __init__(self, output: str, project: str | None = None):
        self.output = output
        self.storage = open_storage(output, project=project)

    def committed_shards(self) -> set[int]:
        """Shards whose part already exists: one listing, not one request per shard."""
        prefix = join(self.output, "parts") + "/"
        try:
            return {int(m.group(1)) for o in self.storage.list(prefix) if (m := _PART_NAME.search(o.uri))}
        except FileNotFoundError:
            return set()

    def discard_interrupted_writes(self) -> None:
        """Clean up after a killed attempt; call before any rank of this run writes."""
        if removed := self.storage.discard_interrupted_writes(self.output):
            log.info("removed %d unfinished write(s) left by an interrupted attempt", removed)

    def commit(self, shard_index: int, result: ShardResult) -> bool:
        """Write the shard's errors, then its part. False if another writer committed it first."""
        name = part_name(shard_index)
        errors_uri = join(self.output, "errors", name)
        # Errors go first and are overwritten, so a crashed attempt's stale error rows
        # are replaced; the part, written last and only if absent, is the commit point.
        if result.errors or self.storage.exists(errors_uri):
            self.storage.write(errors_uri, _csv_bytes(ERROR_COLUMNS, result.errors))
        won = self.storage.write(
            join(self.output, "parts", name), _csv_bytes(PART_COLUMNS, result.rows), if_absent=True
        )
        if not won:
            log.warning("shard %d was already committed by another writer; keeping theirs", shard_index)
        return won

    def write_summary(self, rank: int, summary: dict) -> None:
        uri = join(self.output, "summary", f"rank-{rank}.json")
        self.storage.write(uri, json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"))
