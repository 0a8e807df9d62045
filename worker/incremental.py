"""Incremental runs: classify only the images that are new or changed since the last good run.

Runs that share a results root are the sibling folders ``<root>/<run>/`` of one another. A run
is *complete* once its aggregate has written ``aggregate/metrics.json`` (the marker, written
last) next to ``aggregate/results.parquet`` (the manifest): every image of that run's input
with its label and the GCS generation it was classified at, carried-over rows included.

An incremental run (``--incremental``) plans in three steps, each written before the next so
that a rerun after a crash recomputes the same plan:

1. ``inventory.jsonl``: every image under the input now, with its generation (a plain GCS
   listing, since DataFlux's fast listing carries no generation).
2. ``run.json``: the base run, the latest complete incremental sibling with the same input
   and model that agrees on what labels depend on, the model's revision included (none on a
   first run), and what the plan holds. A full run is never a base: its
   fast DataFlux listing has no generations, so it cannot show that an image is unchanged.
3. ``plan.jsonl``: the inventory entries whose ``(uri, generation)`` the base's manifest does
   not hold, i.e. new objects, overwritten objects, and objects the base could not classify
   (their errors are retried).

The aggregate then checks exactly-once over the plan as usual, and writes the union: the
base's rows for images still in the inventory at the same generation, plus this run's rows.
Rows of deleted objects are dropped because their URI is not in the inventory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.results import (
    INVENTORY_FILE,
    LABEL_KEYS,
    MANIFEST,
    CompletedRun,
    completed_runs,
    decode_plan,
    differences,
    encode_plan,
    read_manifest,
    read_run_record,
    results_root_of,
    run_record,
)
from worker.storage import ObjectInfo, join, open_storage

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


def plan_incremental(
    cfg: WorkerConfig,
    list_input: Callable[[WorkerConfig], list[ObjectInfo]],
    current: Callable[[], dict] | None = None,
) -> tuple[list[ObjectInfo], dict]:
    """Plan an incremental run: the inventory minus what the base run already classified.

    Args:
        cfg: The worker config (``cfg.incremental`` is set, the input is gs://).
        list_input: Lists the input's images with their generations (stage 1's listing).
        current: This run's settings and model revision (it may wait for the model), to choose a
            base whose labels are this run's.

    Returns:
        The plan, and the ``run.json`` content to record with it.
    """
    out = open_storage(cfg.output, project=cfg.project)
    inventory_uri = join(cfg.output, INVENTORY_FILE)
    if out.exists(inventory_uri):  # a rerun after a crash: the recorded inventory is the contract
        inventory = decode_plan(out.read(inventory_uri))
    else:
        inventory = list_input(cfg)
        if not out.write(inventory_uri, encode_plan(inventory), if_absent=True):
            inventory = decode_plan(out.read(inventory_uri))
    recorded = read_run_record(cfg.output, project=cfg.project)
    if recorded:
        base_uri = recorded["base"]
    else:
        base = latest_base(cfg.output, cfg.input, cfg.model, current=current, project=cfg.project)
        base_uri = base.results_uri if base else None

    done: dict[str, int | None] = {}
    if base_uri:
        import pandas as pd

        rows = read_manifest(join(base_uri, MANIFEST), ["uri", "generation"], project=cfg.project)
        done = {
            u: None if pd.isna(g) else int(g) for u, g in zip(rows["uri"], rows["generation"], strict=False)
        }
    present = {o.uri for o in inventory}
    # A generation-less entry can never be proven unchanged, so it is always replanned.
    plan = [o for o in inventory if o.generation is None or done.get(o.uri) != o.generation]
    reused = len(inventory) - len(plan)
    changed = sum(1 for o in plan if o.uri in done)
    info = run_record(
        cfg.input,
        cfg.model,
        incremental=True,
        base=base_uri,
        inventory=INVENTORY_FILE,
        listed=len(inventory),
        planned=len(plan),
        reused=reused,
        changed=changed,
        deleted=sum(1 for u in done if u not in present),
    )
    log.info(
        "incremental plan: %d of %d images are new or changed since %s (%d reused, %d deleted)",
        len(plan),
        len(inventory),
        base_uri or "no earlier complete run",
        reused,
        info["deleted"],
    )
    return plan, info
