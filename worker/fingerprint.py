"""Stage 1's guard: a run adds results only to results of the same run, never to another's.

``OUTPUT/run.json`` records what the results under OUTPUT are made from, and its
*fingerprint* (``worker.results.FINGERPRINT_KEYS``: input, model and its revision, the
settings that change outputs, the incremental base, the plan's SHA-256) is in the name of every
part the run commits. Rank 0 checks OUTPUT against this run before any rank reads an image:

1. at once, before the model loads: the record's settings (input, model, task, shard size,
   device type, decode, incremental);
2. with the plan in hand: the plan the record was made with (OUTPUT's plan is reused;
   one listed anew must equal it);
3. with the model fetched: its revision (the hub commit, or the SHA-256 of the directory's
   files as loaded), then the fingerprints in the names of the parts under ``parts/``.

Where OUTPUT holds results (a part of any run, or the aggregate's marker) that are not this
run's, the worker stops with one line saying what differs (``RunMismatch``, exit 2), unless
``--overwrite`` asks to start over: that deletes them first. Where OUTPUT holds no results,
its record and plan describe an attempt that committed nothing (it failed, or the launcher
planned it before any model was known): they are replaced without asking, so ``run.json``
never keeps the model of a first attempt that failed.

When the record is final: rank 0 writes what it knows before the plan (an unsealed record:
no model revision, no fingerprint), and seals it (``worker.results.sealed``) once the model is
fetched, still before any rank reads an image. A sealed record is final once a part carries its
fingerprint: from then on only a run with the same fingerprint adds to OUTPUT (a resume), and
only ``--overwrite`` replaces it. A rerun with ``--overwrite`` and the same fingerprint resumes
too, so a retried job keeps its committed shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from worker.commit import Committer
from worker.config import ConfigError, WorkerConfig
from worker.exported import SIDECAR_FILES
from worker.model_files import fetch_model
from worker.plan import make_plan
from worker.plan_store import TableIndex, read_index
from worker.results import (
    COLUMNS_KEY,
    ERRORS_DIR,
    INVENTORY_DIR,
    INVENTORY_FILE,
    LABEL_KEYS,
    MANIFEST,
    MARKER,
    PARTS_DIR,
    PLAN_DIR,
    PLAN_FILE,
    RUN_FILE,
    SUMMARY_DIR,
    differences,
    parse_part,
    plan_digest,
    read_run_record,
    sealed,
    write_run_record,
)
from worker.schema import Column, schema_to_json
from worker.storage import folder, join, open_storage

log = logging.getLogger(__name__)

_DELETE_THREADS = 16
_HUB_COMMIT = re.compile(r"[0-9a-f]{40}")


class RunMismatch(ConfigError):
    """OUTPUT holds results of another run; the message says what differs, in one line."""

    def __init__(self, message: str):
        super().__init__(message, "output")


@dataclass(frozen=True)
class Plan:
    """This run's plan.

    Attributes:
        index_bytes: Its ``plan/index.json`` (``worker.plan_store.TableIndex``): the pieces
            that hold the images, sorted by URI.
        sha256: The SHA-256 of the index's bytes, which name every piece's.
        record: What it was made from, with this run's settings: the record before it is sealed.
    """

    index_bytes: bytes
    sha256: str
    record: dict

    @property
    def index(self) -> TableIndex:
        return TableIndex.decode(self.index_bytes)

    @property
    def images(self) -> int:
        return self.index.images


def model_revision(model_path: str) -> str:
    """What identifies the model's files as loaded from ``model_path``.

    A hub snapshot (``.../snapshots/<commit>``) is its commit; any other directory (a local
    one, or a gs:// one fetched into the cache) is the SHA-256 over its files' relative paths
    and contents, hidden files (``.git``...) left out; an exported model's file is the same over
    it and the files beside it that it uses (``worker.exported.SIDECAR_FILES``).
    """
    path = Path(model_path)
    if path.parent.name == "snapshots" and _HUB_COMMIT.fullmatch(path.name):
        return f"hub:{path.name}"
    digest = hashlib.sha256()
    if path.is_file():  # an exported model: its file and those beside it that it uses
        files = [path, *(p for name in SIDECAR_FILES if (p := path.parent / name).is_file())]
        path = path.parent
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(file, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return f"sha256:{digest.hexdigest()}"


def clear_results(output: str, *, everything: bool, project: str | None = None) -> int:
    """Delete the results under OUTPUT, and with ``everything`` its plan, inventory and record too.

    The aggregate's marker goes first, so that no sibling run takes a half-deleted run for a
    complete one, and ``run.json`` last, so that an interrupted clear is refused (or cleared)
    again by the next run. Only the files the results contract names are touched.

    Returns:
        How many files were deleted.
    """
    storage = open_storage(output, project=project)
    first = [join(output, MARKER), join(output, MANIFEST)]
    # A table's index goes before its pieces, so that no index outlives a piece it names.
    if everything:
        first += [join(output, INVENTORY_FILE), join(output, PLAN_FILE)]
    rest = []
    for directory in (PARTS_DIR, ERRORS_DIR, SUMMARY_DIR, *((PLAN_DIR, INVENTORY_DIR) if everything else ())):
        try:
            rest += [o.uri for o in storage.list(folder(join(output, directory)))]
        except FileNotFoundError:
            pass
    deleted = sum(storage.delete(uri) for uri in first)
    with ThreadPoolExecutor(_DELETE_THREADS) as pool:
        deleted += sum(pool.map(storage.delete, rest))
    if everything:
        deleted += storage.delete(join(output, RUN_FILE))
    return deleted


class OutputGuard:
    """Rank 0's check that OUTPUT holds nothing but this run's results (the module docstring).

    Args:
        cfg: The run's config.
        device_type: The device type the ranks run on; None where it is not known yet (the
            launcher, which plans incremental runs before any job exists).
        columns: The task's part columns, recorded at the seal for the aggregate; None where
            not known (the launcher: the worker seals the record).
    """

    def __init__(self, cfg: WorkerConfig, device_type: str | None, columns: Sequence[Column] | None = None):
        self.cfg = cfg
        self.columns = columns
        self.storage = open_storage(cfg.output, project=cfg.project)
        self.settings = task_settings(cfg, cfg.fingerprint_settings(device_type))
        # What OUTPUT's record said when this run looked, or {} once this run has started over.
        self.recorded = read_run_record(cfg.output, project=cfg.project)

    def check_settings(self) -> None:
        """Step 1: refuse at once (or start over) if OUTPUT's record has other settings.

        Raises:
            RunMismatch: OUTPUT holds results of a run with other settings, and no --overwrite.
        """
        if self.recorded and (why := differences(self.recorded, self.settings)):
            self._start_over(why, everything=True)

    def plan(self, revision: Callable[[], str] | None = None) -> Plan:
        """Step 2: OUTPUT's plan, or a new one, written after the record of what it was made from.

        Args:
            revision: The model's revision (it may wait for the model): an incremental run
                builds only on a base made with the same one (``worker.incremental``).

        Raises:
            RunMismatch: OUTPUT holds results made with another plan, and no --overwrite.
        """
        cfg = self.cfg
        plan_uri = join(cfg.output, PLAN_FILE)
        found = read_index(join(cfg.output, PLAN_DIR), project=cfg.project)
        data = found[1] if found else None
        if data is not None and not self.recorded:
            # Nothing says what this plan was made from (its record was deleted, or an older
            # worker wrote it), so it cannot be trusted to be this run's.
            self._start_over(f"{PLAN_FILE} has no {RUN_FILE} beside it", everything=True)
            data = None
        fresh = data is None
        current = (lambda: {**self.settings, "model_revision": revision()}) if revision else None
        if fresh:
            data, made_from = make_plan(cfg, current)
        else:
            if current and (why := self._base_disagrees(self.recorded, current)):
                # Planned where the revision was not known (an older launcher): its base would
                # carry another model's labels over. Nothing is committed before the seal.
                self._start_over(f"its incremental base was classified with {why}", everything=True)
                return self.plan(revision)
            made_from = self.recorded
        sha256 = plan_digest(data)
        if self.recorded and (why := differences(self.recorded, {"plan_sha256": sha256})):
            self._start_over(f"{why} (the input's listing changed since)", everything=False)
        record = {k: v for k, v in made_from.items() if k not in ("fingerprint", "model_revision")}
        record.update(self.settings, plan_sha256=sha256)
        images = TableIndex.decode(data).images
        if fresh:
            if self.recorded.get("plan_sha256") != sha256:
                write_run_record(cfg.output, record, project=cfg.project)
            if not self.storage.write(plan_uri, data, if_absent=True) and self.storage.read(plan_uri) != data:
                raise RunMismatch(f"another job wrote a different plan to {cfg.output} at the same time")
            log.info("planned %d images from %s -> %s", images, cfg.input, plan_uri)
        else:
            log.info("reusing the existing plan %s: %d images", plan_uri, images)
        return Plan(data, sha256, record)

    def seal(self, plan: Plan, revision: str) -> tuple[str, set[int]]:
        """Step 3: seal this run's record once its model is fetched.

        Args:
            plan: This run's plan (from ``plan``).
            revision: The model's revision (``model_revision`` of the directory it was loaded from).

        Returns:
            The run's fingerprint, and the shards it has already committed.

        Raises:
            RunMismatch: OUTPUT holds results of another model revision, or parts of another
                run, and no --overwrite.
        """
        cfg = self.cfg
        record = sealed({**plan.record, "model_revision": revision})
        if self.columns is not None:
            record[COLUMNS_KEY] = schema_to_json(self.columns)
        fingerprint = record["fingerprint"]
        if self.recorded.get("fingerprint") not in (None, fingerprint):
            self._start_over(
                differences(self.recorded, record) or "its fingerprint differs", everything=False
            )
        committed, foreign = Committer(cfg.output, fingerprint, cfg.project).scan()
        if foreign:
            shown = foreign[0] + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
            self._start_over(f"{PARTS_DIR}/ holds parts of another run: {shown}", everything=False)
            committed = set()
        if self.recorded != record:
            write_run_record(cfg.output, record, project=cfg.project)
        log.info("run %s: %s with %s (%s)", fingerprint, cfg.input, cfg.model, record["model_revision"])
        return fingerprint, committed

    def _base_disagrees(self, record: dict, current: Callable[[], dict]) -> str:
        """How the incremental base in ``record`` differs from this run in what labels depend on ("" if not)."""
        base = record.get("base")
        if not base:
            return ""
        try:
            marker = json.loads(self.storage.read(join(base, MARKER)))
        except FileNotFoundError:
            return ""  # the aggregate reports a base that is gone
        return differences(marker.get("run", {}), current(), LABEL_KEYS)

    def _start_over(self, why: str, *, everything: bool) -> None:
        """Refuse, or delete OUTPUT's results (and with ``everything`` its plan and record)."""
        out = self.cfg.output
        if self._holds_results():
            if not self.cfg.overwrite:
                raise RunMismatch(
                    f"{out} holds results of another run: {why}; rerun with --overwrite to replace "
                    "them, or choose another --output"
                )
            log.warning("--overwrite: deleting the results of another run in %s (%s)", out, why)
        else:
            log.info("replacing the record of an attempt at %s that committed nothing (%s)", out, why)
        clear_results(out, everything=everything, project=self.cfg.project)
        self.recorded = {}

    def _holds_results(self) -> bool:
        """Whether OUTPUT holds a part of any run, or the aggregate's marker."""
        prefix = folder(join(self.cfg.output, PARTS_DIR))
        try:
            if any(parse_part(o.uri[len(prefix) :]) for o in self.storage.list(prefix)):
                return True
        except FileNotFoundError:
            pass
        return self.storage.exists(join(self.cfg.output, MARKER))


def task_settings(cfg: WorkerConfig, settings: dict) -> dict:
    """The settings with ``labels_file`` standing for its content too: a labels file rewritten
    in place changes the labels, so the results.
    """
    if not cfg.labels_file:
        return settings
    try:
        data = open_storage(cfg.labels_file, project=cfg.project).read(cfg.labels_file)
    except FileNotFoundError:
        raise ConfigError(f"--labels-file {cfg.labels_file}: no such file", "labels_file") from None
    return {**settings, "labels_file": f"{cfg.labels_file} sha256:{hashlib.sha256(data).hexdigest()}"}


def check_output(cfg: WorkerConfig) -> None:
    """Step 1 where no job runs yet (the launcher): another run's results stop the run before
    any GPU is provisioned, rather than after, in the job's first rank.
    """
    OutputGuard(cfg, None).check_settings()


def prepare_plan(cfg: WorkerConfig) -> Plan:
    """Steps 1 and 2 where no job runs yet (the launcher plans incremental runs before any job).

    The model's revision decides which earlier run's rows may be reused, so the model is
    fetched here once it is needed: for a hub id only its config (the snapshot's folder names
    the commit), otherwise into the model cache, as a node would.
    """
    guard = OutputGuard(cfg, None)
    guard.check_settings()

    def revision() -> str:
        path = fetch_model(
            cfg.model, cfg.model_cache, download=True, project=cfg.project, hub_files=["config.json"]
        )
        return model_revision(path)

    return guard.plan(revision)
