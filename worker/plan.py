"""Stage 1 — plan: list the input once, keep images, sort, split into shards.

The plan is the job's contract. It is listed once (rank 0), written to
``OUTPUT/plan.jsonl`` and handed to every rank, so all ranks agree on the order.
A rerun with the same OUTPUT reuses the plan already there, so shard boundaries
never move under committed parts. ``OUTPUT/run.json``, written just before the plan,
records what the plan was made from (input, model, and for ``--incremental`` runs the
base run the plan is the difference to: see ``worker.incremental``); ``worker.fingerprint``
decides whether OUTPUT's plan is this run's, and writes both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from worker.archives.columns import MemberColumns
from worker.archives.listing import archives_in_listing, list_archived_input
from worker.config import WorkerConfig, is_image
from worker.incremental import plan_incremental
from worker.results import run_record
from worker.storage import ObjectInfo, is_gcs, open_storage

log = logging.getLogger(__name__)

# DataFlux composes temporary objects here; they are never inputs.
DATAFLUX_COMPOSITES = "dataflux-composed-objects/"


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def list_input(cfg: WorkerConfig) -> list[ObjectInfo]:
    """Every image under the input, sorted by URI (with GCS generations for incremental runs);
    images inside archives (``--input-layout``) by archive and offset instead.
    """
    storage = open_storage(cfg.input, project=cfg.project)
    if (archived := list_archived_input(cfg, storage)) is not None:
        return archived
    if cfg.incremental:
        listed = list(storage.list(cfg.input))  # with GCS generations, which fast_list lacks
    else:
        listed = storage.fast_list(cfg.input, processes=cfg.list_processes)
    output_prefix = cfg.output.rstrip("/") + "/"
    images = [
        o
        for o in listed
        if is_image(o.uri) and DATAFLUX_COMPOSITES not in o.uri and not o.uri.startswith(output_prefix)
    ]
    images.sort(key=lambda o: o.uri)
    if not images and cfg.input_layout == "auto":
        images = archives_in_listing(storage, [o for o in listed if not o.uri.startswith(output_prefix)])
    if is_gcs(cfg.input) and not listed:
        log.warning("no objects at all under %s (check the prefix)", cfg.input)
    return images


def make_plan(cfg: WorkerConfig) -> tuple[list[ObjectInfo], dict]:
    """A new plan from a listing of the input, and the record of what it was made from.

    For ``--incremental`` the plan is the difference to the base run (``worker.incremental``),
    whose inventory it writes; nothing else is written (``worker.fingerprint`` writes the
    record and then the plan).
    """
    if cfg.incremental:
        return plan_incremental(cfg, list_input)
    return list_input(cfg), run_record(cfg.input, cfg.model, incremental=False)


@dataclass(frozen=True)
class PlanColumns(Sequence[ObjectInfo]):
    """A plan as parallel lists: cheap to pickle and broadcast to every rank, and an
    ObjectInfo is built only when a rank reads it, not a million of them up front.

    ``members``: where each image lies inside an archive, for a plan of archive members.
    """

    uris: list[str]
    sizes: list[int]
    generations: list[int | None]
    members: MemberColumns | None = None

    @classmethod
    def of(cls, plan: Sequence[ObjectInfo]) -> PlanColumns:
        members = MemberColumns() if plan and plan[0].member is not None else None
        for o in plan if members is not None else ():
            members.append(o)
        return cls([o.uri for o in plan], [o.size for o in plan], [o.generation for o in plan], members)

    def __len__(self) -> int:
        return len(self.uris)

    def _get(self, i: int) -> ObjectInfo:
        if self.members is None:
            return ObjectInfo(self.uris[i], self.sizes[i], self.generations[i])
        return ObjectInfo(self.uris[i], self.sizes[i], self.generations[i], *self.members.get(i))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        return self._get(index if index >= 0 else index + len(self))


def make_shards(n_images: int, shard_size: int) -> list[Shard]:
    """Fixed-size shards covering [0, n) exactly: no padding, no drops."""
    return [
        Shard(i, start, min(start + shard_size, n_images))
        for i, start in enumerate(range(0, n_images, shard_size))
    ]


def static_assignment(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """Shard i goes to rank i mod world: deterministic, and balanced to within one shard."""
    return shards[rank::world_size]
