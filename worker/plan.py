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
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from worker.archives.columns import MemberColumns
from worker.archives.listing import archives_in_listing, list_archived_input
from worker.config import WorkerConfig, is_image
from worker.incremental import plan_incremental
from worker.results import run_record
from worker.storage import ObjectInfo, folder, is_gcs, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def list_input(cfg: WorkerConfig) -> list[ObjectInfo]:
    """Every image in the input folder, sorted by URI (with GCS generations for incremental runs);
    images inside archives (``--input-layout``) by archive and offset instead.

    ``gs://bucket/pre`` is the folder ``pre/``: ``pre2/a.jpg`` and ``preview.jpg`` are not in it.
    """
    storage = open_storage(cfg.input, project=cfg.project)
    if (archived := list_archived_input(cfg, storage)) is not None:
        return archived
    root = folder(cfg.input)
    if cfg.incremental:
        listed = list(storage.list(root))  # with GCS generations, which fast_list lacks
    else:
        listed = storage.fast_list(root, processes=cfg.list_processes)
    output_prefix = folder(cfg.output)
    images = [o for o in listed if is_image(o.uri) and not o.uri.startswith(output_prefix)]
    images.sort(key=lambda o: o.uri)
    if not images and cfg.input_layout == "auto":
        images = archives_in_listing(storage, [o for o in listed if not o.uri.startswith(output_prefix)])
    if is_gcs(cfg.input) and not listed:
        log.warning("no objects at all under %s (check the prefix)", root)
    return images


def make_plan(cfg: WorkerConfig, current: Callable[[], dict] | None = None) -> tuple[list[ObjectInfo], dict]:
    """A new plan from a listing of the input, and the record of what it was made from.

    For ``--incremental`` the plan is the difference to the base run (``worker.incremental``;
    ``current``: this run's settings and model revision, which the base must agree with), whose
    inventory it writes; nothing else is written (``worker.fingerprint`` writes the record and
    then the plan).
    """
    if cfg.incremental:
        return plan_incremental(cfg, list_input, current)
    return list_input(cfg), run_record(cfg.input, cfg.model, incremental=False)


_NO_GENERATION = -1  # GCS generations are positive


@dataclass(frozen=True)
class PlanColumns(Sequence[ObjectInfo]):
    """A plan in compact columns: the URIs as one UTF-8 buffer with their end offsets, the sizes
    and generations as machine integers. A million images take ~70 MB instead of ~300 MB of
    Python objects, pickle fast for the broadcast to every rank, and an ``ObjectInfo`` is built
    only when a rank reads it. ``members``: where each image lies, for a plan of archive members.
    """

    uris: bytearray
    ends: array
    sizes: array
    generations: array
    members: MemberColumns | None = None

    @classmethod
    def of(cls, plan: Iterable[ObjectInfo]) -> PlanColumns:
        if isinstance(plan, PlanColumns):
            return plan
        uris, ends, sizes, generations = bytearray(), array("Q"), array("q"), array("q")
        members = None
        for o in plan:
            if not ends and o.member is not None:
                members = MemberColumns()
            if (o.member is None) != (members is None):
                raise ValueError("a plan holds archive members and objects of their own at once")
            uris += o.uri.encode("utf-8")
            ends.append(len(uris))
            sizes.append(o.size)
            generations.append(_NO_GENERATION if o.generation is None else o.generation)
            if members is not None:
                members.append(o)
        return cls(uris, ends, sizes, generations, members)

    def __len__(self) -> int:
        return len(self.ends)

    def _get(self, i: int) -> ObjectInfo:
        start = self.ends[i - 1] if i else 0
        generation = self.generations[i]
        info = ObjectInfo(
            self.uris[start : self.ends[i]].decode("utf-8"),
            self.sizes[i],
            None if generation == _NO_GENERATION else generation,
        )
        return info if self.members is None else info._replace(**self.members.get(i))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("plan index out of range")
        return self._get(index)


def make_shards(n_images: int, shard_size: int) -> list[Shard]:
    """Fixed-size shards covering [0, n) exactly: no padding, no drops."""
    return [
        Shard(i, start, min(start + shard_size, n_images))
        for i, start in enumerate(range(0, n_images, shard_size))
    ]


def static_assignment(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """Shard i goes to rank i mod world: deterministic, and balanced to within one shard."""
    return shards[rank::world_size]
