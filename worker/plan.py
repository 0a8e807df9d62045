"""Stage 1 — plan: list the input once, keep images, sort, split into shards.

The plan is the job's contract. It is listed once (rank 0), streamed into an on-disk table
sorted by URI, and written to ``OUTPUT/plan/`` as Parquet pieces of whole shards with an index
(``worker.plan_store``); every rank reads the index and then only the shards it processes, so
all ranks agree on the order and none holds the whole plan. A rerun with the same OUTPUT reuses
the plan already there, so shard boundaries never move under committed parts. ``OUTPUT/run.json``,
written just before the plan's index, records what the plan was made from (input, model, and for
``--incremental`` runs the base run the plan is the difference to: see ``worker.incremental``);
``worker.fingerprint`` decides whether OUTPUT's plan is this run's, and writes both.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.archives.listing import archives_in_listing, is_archive, list_archived_input
from worker.config import WorkerConfig, is_image
from worker.incremental import plan_incremental
from worker.plan_store import SELECT_COLUMNS, PlanDB
from worker.results import PLAN_DIR, run_record
from worker.storage import ObjectInfo, folder, is_gcs, join, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class Listing:
    """The input's images, streamed in pages as the listing finds them (``list_input``).

    ``ordered`` (known once the pages are all read): the entries are archive members, already in
    plan order (by archive and offset); otherwise the plan sorts them by URI.
    """

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.ordered = False
        self.listed = 0

    def __iter__(self) -> Iterator[list[ObjectInfo]]:
        cfg = self.cfg
        storage = open_storage(cfg.input, project=cfg.project)
        if (archived := list_archived_input(cfg, storage)) is not None:
            self.ordered = True
            yield from archived
            return
        root, output_prefix = folder(cfg.input), folder(cfg.output)
        images, archives = 0, []
        for page in storage.list_pages(root, cfg.list_processes):
            self.listed += len(page)
            kept = [o for o in page if not o.uri.startswith(output_prefix)]
            found = [o for o in kept if is_image(o.uri)]
            images += len(found)
            if found:
                yield found
            elif not images and cfg.input_layout == "auto":
                archives += [o for o in kept if is_archive(o.uri)]
        if not images and archives and cfg.input_layout == "auto":
            self.ordered = True
            yield from archives_in_listing(storage, archives)
        if is_gcs(cfg.input) and not self.listed:
            log.warning("no objects at all under %s (check the prefix)", root)

    def sorted(self) -> list[ObjectInfo]:
        """The whole listing in plan order, in memory, as the plan holds it: for small inputs
        (tests, tools).
        """
        entries = [o for page in self for o in page]
        if not self.ordered:
            return sorted(entries, key=lambda o: o.uri)
        last = {o.uri: i for i, o in enumerate(entries)}  # as ``PlanDB.keep_last_per_uri``
        return [o for i, o in enumerate(entries) if last[o.uri] == i]

    def load_into(self, db: PlanDB, table: str) -> int:
        """``table`` of ``db`` from the listing's pages, one row per URI; its rows."""
        rows = db.load(table, self)
        if self.ordered:
            rows -= db.keep_last_per_uri(table)
        return rows


def list_input(cfg: WorkerConfig) -> Listing:
    """Every image in the input folder (with GCS generations), to be sorted by URI; images inside
    archives (``--input-layout``) by archive and offset instead.

    ``gs://bucket/pre`` is the folder ``pre/``: ``pre2/a.jpg`` and ``preview.jpg`` are not in it.
    """
    return Listing(cfg)


def write_listing(db: PlanDB, table: str, ordered: bool, dest: str, cfg: WorkerConfig) -> bytes:
    """Write ``table`` of ``db`` in plan order (as listed for archive members, else by URI) as a
    table under ``dest``; the index's bytes.
    """
    query = f"SELECT {SELECT_COLUMNS} FROM {table} ORDER BY {'seq' if ordered else 'uri'}"
    return db.write(query, dest, cfg.shard_size, archived=ordered, project=cfg.project)


def make_plan(cfg: WorkerConfig, current: Callable[[], dict] | None = None) -> tuple[bytes, dict]:
    """A new plan from a listing of the input: its pieces written under ``OUTPUT/plan/``, the bytes
    of its index (not written yet) and the record of what it was made from.

    For ``--incremental`` the plan is the difference to the base run (``worker.incremental``;
    ``current``: this run's settings and model revision, which the base must agree with), whose
    inventory it writes; ``worker.fingerprint`` writes the record and then the plan's index.
    The listing is sorted in a scratch folder (``TMPDIR``) that holds about twice its size.
    """
    with tempfile.TemporaryDirectory(prefix="plan-") as scratch:
        db = PlanDB(Path(scratch))
        try:
            if cfg.incremental:
                return plan_incremental(cfg, db, list_input, write_listing, current)
            listing = list_input(cfg)
            listing.load_into(db, "listing")
            index = write_listing(db, "listing", listing.ordered, join(cfg.output, PLAN_DIR), cfg)
            return index, run_record(cfg.input, cfg.model, incremental=False)
        finally:
            db.close()


class Shards(Sequence[Shard]):
    """Fixed-size shards covering [0, n) exactly, no padding, no drops, made on demand: a hundred
    million images are ~100,000 shards, which no rank needs as objects at once. A slice is
    another ``Shards`` over a ``range`` of shard numbers.
    """

    def __init__(self, n_images: int, shard_size: int, numbers: range | None = None):
        self.n_images = n_images
        self.shard_size = shard_size
        self.numbers = range(-(-n_images // shard_size)) if numbers is None else numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Shards(self.n_images, self.shard_size, self.numbers[index])
        number = self.numbers[index]
        start = number * self.shard_size
        return Shard(number, start, min(start + self.shard_size, self.n_images))


def make_shards(n_images: int, shard_size: int) -> Shards:
    """Fixed-size shards covering [0, n) exactly: no padding, no drops."""
    return Shards(n_images, shard_size)


def static_assignment(shards: Shards, rank: int, world_size: int) -> Shards:
    """Shard i goes to rank i mod world: deterministic, and balanced to within one shard."""
    return shards[rank::world_size]
