"""Stage 5 — commit: one CSV part per shard, written atomically; the part's existence marks the shard done.

A part's name carries the fingerprint of the run it was computed for (``worker.results``), so a
shard counts as committed only by a part of this very run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from worker.results import (
    ERROR_COLUMNS,
    ERRORS_DIR,
    PART_COLUMNS,
    PARTS_DIR,
    SUMMARY_DIR,
    encode_rows,
    parse_part,
    part_name,
    summary_name,
)
from worker.storage import folder, join, open_storage

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    rows: list[tuple] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def discard_interrupted_writes(output: str, project: str | None = None) -> None:
    """Clean up after a killed attempt; call before any rank of this run writes."""
    if removed := open_storage(output, project=project).discard_interrupted_writes(output):
        log.info("removed %d unfinished write(s) left by an interrupted attempt", removed)


class Committer:
    """Commits the shards of the run whose fingerprint is ``fingerprint``."""

    def __init__(
        self,
        output: str,
        fingerprint: str,
        project: str | None = None,
        columns: tuple[str, ...] | list[str] = PART_COLUMNS,
    ):
        self.output = output
        self.columns = tuple(columns)  # the part's header: the task's columns
        self.fingerprint = fingerprint
        self.storage = open_storage(output, project=project)

    def scan(self) -> tuple[set[int], list[str]]:
        """The shards this run has committed, and the parts of any other run: one listing, streamed
        (tens of thousands of parts are a few dozen pages), never a request per shard.
        """
        prefix = folder(join(self.output, PARTS_DIR))
        committed, foreign = set(), []
        try:
            uris = [o.uri for page in self.storage.list_pages(prefix) for o in page]
        except FileNotFoundError:
            return set(), []
        for uri in uris:
            part = parse_part(uri[len(prefix) :])
            if part is None:
                continue
            if part[1] == self.fingerprint:
                committed.add(part[0])
            else:
                foreign.append(uri)
        return committed, sorted(foreign)

    def commit(self, shard_index: int, result: ShardResult) -> bool:
        """Write the shard's errors, then its part. False if another writer committed it first."""
        name = part_name(shard_index, self.fingerprint)
        errors_uri = join(self.output, ERRORS_DIR, name)
        # Errors go first and are overwritten, so a crashed attempt's stale error rows
        # are replaced; the part, written last and only if absent, is the commit point.
        if result.errors or self.storage.exists(errors_uri):
            self.storage.write(errors_uri, encode_rows(ERROR_COLUMNS, result.errors))
        part_uri = join(self.output, PARTS_DIR, name)
        data = encode_rows(self.columns, result.rows)
        if self.storage.write(part_uri, data, if_absent=True):
            return True
        # A create-only write that finds the object there: either its own first request landed
        # and only the response was lost (the client retried), or another writer of this run won.
        if self.storage.read(part_uri) == data:
            log.info(
                "shard %d: its part was already written with these very bytes (a retried write whose "
                "first response was lost); committed",
                shard_index,
            )
            return True
        log.warning(
            "shard %d was already committed by another writer of this run; keeping theirs", shard_index
        )
        return False

    def write_summary(self, rank: int, summary: dict) -> None:
        uri = join(self.output, SUMMARY_DIR, summary_name(rank))
        self.storage.write(uri, json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"))


class CommitQueue:
    """Commits shards on one thread beside the processing loop, in the order they are handed in.

    A part is encoded, written and (on local disk) fsynced, or sent to GCS in one request of tens
    of milliseconds; done in the loop, the GPU idled meanwhile (an embedding part is megabytes).
    At most ``backlog`` shards wait, so a slow store slows the loop instead of filling memory, and
    a failed commit is raised in the loop at the next hand-in or at ``close``.

    Args:
        committer: Writes each shard.
        uri_column: The rows' URI cell, by which a part's rows are sorted.
        kill_after: Fault injection for resume tests: SIGKILL the process once this many shards
            are committed (0: never). The commit thread does it, so exactly that many are.
    """

    def __init__(self, committer: Committer, uri_column: int, *, backlog: int = 2, kill_after: int = 0):
        self.committer = committer
        self.uri_column = uri_column
        self.backlog = backlog
        self.kill_after = kill_after
        self.committed = 0
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="commit")

    def submit(self, shard_index: int, result: ShardResult) -> None:
        while len(self._pending) >= self.backlog:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._commit, shard_index, result))

    def __enter__(self) -> CommitQueue:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the shards handed in are whole: let them commit, and raise the loop's error
            self._pool.shutdown(wait=True)

    def close(self) -> int:
        """Wait for every commit (raising the first failure); the number of shards done."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return self.committed

    def _commit(self, shard_index: int, result: ShardResult) -> None:
        result.rows.sort(key=lambda row: row[self.uri_column])
        result.errors.sort()
        self.committer.commit(shard_index, result)  # False: another writer of this run committed it
        self.committed += 1
        if self.kill_after and self.committed >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
