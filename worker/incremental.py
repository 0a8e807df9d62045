"""Incremental runs: classify only the images that are new or changed since the last good run.

Runs that share a results root are the sibling folders ``<root>/<run>/`` of one another. A run
is *complete* once its aggregate has written ``aggregate/metrics.json`` (the marker, written
last) next to ``aggregate/results.parquet`` (the manifest): every image of that run's input
with its label and the GCS generation it was classified at, carried-over rows included.

An incremental run (``--incremental``) plans in three steps, each written before the next so
that a rerun after a crash recomputes the same plan:

1. ``inventory/``: every image under the input now, with its generation, as a table of the
   plan's form (``worker.plan_store``).
2. ``run.json``: the base run, the latest complete incremental sibling with the same input
   and model that agrees on what labels depend on, the model's revision included (none on a
   first run), and what the plan holds. A full run is never a base: its
   fast DataFlux listing has no generations, so it cannot show that an image is unchanged.
3. ``plan/``: the inventory entries whose ``(uri, generation)`` the base's manifest does
   not hold, i.e. new objects, overwritten objects, and objects the base could not classify
   (their errors are retried).

Each step runs in DuckDB over tables on disk (the inventory, the base's manifest), so a hundred
million images plan in bounded memory.

The aggregate then checks exactly-once over the plan as usual, and writes the union: the
base's rows for images still in the inventory at the same generation, plus this run's rows.
Rows of deleted objects are dropped because their URI is not in the inventory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from worker.plan_store import (
    PlanDB,
    count_over_partitions,
    each_partition,
    fetch_pieces,
    partitions_for,
    read_index,
    split_by_uri,
)
from worker.results import (
    INVENTORY_DIR,
    INVENTORY_FILE,
    LABEL_KEYS,
    MANIFEST,
    PLAN_DIR,
    CompletedRun,
    completed_runs,
    differences,
    read_run_record,
    results_root_of,
    run_record,
)
from worker.storage import join, open_storage

if TYPE_CHECKING:
    from worker.config import WorkerConfig

log = logging.getLogger(__name__)


def latest_base(
    results_uri: str,
    input_uri: str,
    model: str,
    *,
    current: Callable[[], dict] | None = None,
    project: str | None = None,
) -> CompletedRun | None:
    """The run an incremental run at ``results_uri`` builds on: the latest complete incremental
    sibling that classified the same input with the same model (only an incremental run recorded
    the generation each row was classified at) and, where ``current`` gives this run's settings
    and model revision, agrees on what the labels depend on (``LABEL_KEYS``): rows of another
    revision of the model, another task or another decode are not this run's labels.
    ``current`` is called once a sibling qualifies on the rest, since it may fetch the model.
    """
    own = results_uri.rstrip("/")
    settings: dict | None = None
    for run in reversed(completed_runs(results_root_of(results_uri), project=project)):
        if run.results_uri == own or not run.incremental or run.input != input_uri or run.model != model:
            continue
        if settings is None:
            settings = current() if current else {}
        why = differences(run.marker.get("run", {}), settings, LABEL_KEYS)
        if why:
            log.info("not building on %s: its rows were made with other settings (%s)", run.results_uri, why)
            continue
        return run
    return None


class Listed(Protocol):
    """Stage 1's listing of the input (``worker.plan.Listing``)."""

    ordered: bool

    def load_into(self, db: PlanDB, table: str) -> int: ...


def plan_incremental(
    cfg: WorkerConfig,
    db: PlanDB,
    list_input: Callable[[WorkerConfig], Listed],
    write_listing: Callable[[PlanDB, str, bool, str, WorkerConfig], bytes],
    current: Callable[[], dict] | None = None,
) -> tuple[bytes, dict]:
    """Plan an incremental run: the inventory minus what the base run already classified.

    Args:
        cfg: The worker config (``cfg.incremental`` is set, the input is gs://).
        db: The scratch database the tables are built in.
        list_input: Lists the input's images with their generations (stage 1's ``Listing``).
        write_listing: Writes a table of ``db`` in plan order as pieces (stage 1's).
        current: This run's settings and model revision (it may wait for the model), to choose a
            base whose labels are this run's.

    Returns:
        The bytes of the plan's index (its pieces are written), and the ``run.json`` content to
        record with it.
    """
    out = open_storage(cfg.output, project=cfg.project)
    inventory_dir = join(cfg.output, INVENTORY_DIR)
    found = read_index(inventory_dir, project=cfg.project)
    if found is None:
        listing = list_input(cfg)
        listing.load_into(db, "inventory")
        ordered = listing.ordered
        data = write_listing(db, "inventory", ordered, inventory_dir, cfg)
        if not out.write(join(cfg.output, INVENTORY_FILE), data, if_absent=True):
            found = read_index(inventory_dir, project=cfg.project)  # another attempt's won
    if found is not None:  # a rerun after a crash: the recorded inventory is the contract
        index, _ = found
        db.load_pieces(
            "inventory", fetch_pieces(inventory_dir, index, db.scratch / "inventory", project=cfg.project)
        )
        ordered = index.archived
    recorded = read_run_record(cfg.output, project=cfg.project)
    if recorded:
        base_uri = recorded["base"]
    else:
        base = latest_base(cfg.output, cfg.input, cfg.model, current=current, project=cfg.project)
        base_uri = base.results_uri if base else None

    listed = db.count("SELECT count(*) FROM inventory")
    if base_uri:
        planned_table, counts = "planned", _difference(db, base_uri, listed, cfg)
    else:
        # No base: the inventory is the plan (no join to run on it).
        planned_table, counts = "inventory", {"planned": listed, "changed": 0, "deleted": 0}
    info = run_record(
        cfg.input,
        cfg.model,
        incremental=True,
        base=base_uri,
        inventory=INVENTORY_FILE,
        listed=listed,
        planned=counts["planned"],
        reused=listed - counts["planned"],
        changed=counts["changed"],
        deleted=counts["deleted"],
    )
    log.info(
        "incremental plan: %d of %d images are new or changed since %s (%d reused, %d deleted)",
        counts["planned"],
        listed,
        base_uri or "no earlier complete run",
        info["reused"],
        info["deleted"],
    )
    return write_listing(db, planned_table, ordered, join(cfg.output, PLAN_DIR), cfg), info


def _difference(db: PlanDB, base_uri: str, listed: int, cfg: WorkerConfig) -> dict[str, int]:
    """Table ``planned``: the inventory entries whose ``(uri, generation)`` the base's manifest
    does not hold; how many, and how many of them the base held at another generation (changed),
    and how many of the base's images are no longer listed (deleted).
    """
    manifest = db.scratch / "base.parquet"
    open_storage(base_uri, project=cfg.project).download(join(base_uri, MANIFEST), str(manifest))
    db.con.execute(
        "CREATE OR REPLACE TABLE base AS SELECT uri, generation FROM read_parquet(?)", [str(manifest)]
    )
    # Each join a hash partition of URIs at a time: at 100 M images whole tables would not fit.
    partitions = partitions_for(max(listed, db.count("SELECT count(*) FROM base")))
    for table in ("inventory", "base"):
        split_by_uri(db.con, table, partitions, db.scratch)
    inventory, base = "inventory_$part", "base_$part"
    db.con.execute("CREATE OR REPLACE TABLE planned AS SELECT * FROM inventory LIMIT 0")
    # A generation-less entry can never be proven unchanged (no join matches it), so it is replanned.
    each_partition(
        db.con,
        f"INSERT INTO planned SELECT i.* FROM {inventory} i ANTI JOIN {base} b "
        "ON i.uri = b.uri AND i.generation = b.generation",
        partitions,
    )
    changed = count_over_partitions(
        db.con,
        f"SELECT count(*) FROM {inventory} p SEMI JOIN {base} b ON p.uri = b.uri "
        f"ANTI JOIN {base} same ON p.uri = same.uri AND p.generation = same.generation",
        partitions,
    )
    deleted = count_over_partitions(
        db.con,
        f"SELECT count(DISTINCT b.uri) FROM {base} b ANTI JOIN {inventory} i ON b.uri = i.uri",
        partitions,
    )
    return {"planned": db.count("SELECT count(*) FROM planned"), "changed": changed, "deleted": deleted}
