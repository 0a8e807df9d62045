"""The results-prefix contract: what a run writes under its OUTPUT prefix, and how it is read back.

Everything that the worker writes and the aggregate, incremental planning or a user reads is
named and encoded here, once::

    OUTPUT/run.json              the run record: what the results are made from, and its fingerprint
    OUTPUT/inventory/            incremental runs: every input image with its generation, as a table
    OUTPUT/plan/index.json       the plan, a table (``worker.plan_store``): its pieces, their rows and SHA-256
    OUTPUT/plan/piece-NNNNN.parquet  the images of consecutive whole shards, sorted by URI (or archive
                                 and offset), one row group per shard
    OUTPUT/parts/part-NNNNN-F.csv  one per shard, PART_COLUMNS; its existence commits the shard
                                 for the run whose fingerprint is F (16 hex digits)
    OUTPUT/errors/part-NNNNN-F.csv the shard's error rows, ERROR_COLUMNS, written before its part
    OUTPUT/summary/rank-R.json   one per rank: images, seconds, start-up and read figures
    OUTPUT/aggregate/results.parquet  the manifest: every row with its GCS generation
    OUTPUT/aggregate/metrics.json     the marker, written last: the run is complete

A run is *complete* once its marker exists; runs sharing a results root are sibling folders.

The run's *fingerprint* is a digest of everything its rows depend on (``FINGERPRINT_KEYS``):
input, model and its revision, the settings that change outputs, the incremental base and the
plan's SHA-256. Every part carries it in its name, so a part computed for another run (another
input, model, plan...) is never counted, and the aggregate names it (``check_parts``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from worker.config import FINGERPRINTED
from worker.schema import Column, label_columns, schema_from_json
from worker.storage import folder, join, open_storage

if TYPE_CHECKING:  # pandas is imported only where a manifest is read
    import pandas as pd

RUN_FILE = "run.json"
# Tables (``worker.plan_store``): a folder of pieces and the index that names them, written last.
TABLE_INDEX = "index.json"
PLAN_DIR = "plan"
PLAN_FILE = f"{PLAN_DIR}/{TABLE_INDEX}"
INVENTORY_DIR = "inventory"
INVENTORY_FILE = f"{INVENTORY_DIR}/{TABLE_INDEX}"
PARTS_DIR = "parts"
ERRORS_DIR = "errors"
SUMMARY_DIR = "summary"
MANIFEST = "aggregate/results.parquet"
MARKER = "aggregate/metrics.json"

# Only committed files match: the local backend's in-flight temp files start with '.'. Names
# without a fingerprint (older workers) or with another's match too, so they can be named.
PART_FILE = re.compile(r"part-(\d+)(?:-([0-9a-f]+))?\.csv")
SUMMARY_FILE = re.compile(r"rank-\d+\.json")
_MARKER_UNDER_ROOT = re.compile(r"[^/]+/" + re.escape(MARKER))
_READ_THREADS = 16

# A classification part row: the image, its top-1 class name, that class's index and score, and
# its URI; the columns of a run whose record names none (``COLUMNS_KEY``). Other tasks declare theirs.
DEFAULT_COLUMNS = label_columns(1)
PART_COLUMNS = tuple(c.name for c in DEFAULT_COLUMNS)
# The run record's key for the part columns the task declared (``worker.schema``); a record
# without it is a classification run's (PART_COLUMNS).
COLUMNS_KEY = "columns"
# An error row: an image that has no part row, and why.
ERROR_COLUMNS = ("uri", "reason")
ERROR_DTYPES = {"uri": str, "reason": str}


def columns_of(record: dict) -> tuple[Column, ...]:
    """The part columns a run record declares (a classification run's where it names none)."""
    return schema_from_json(record[COLUMNS_KEY]) if record.get(COLUMNS_KEY) else DEFAULT_COLUMNS


def part_name(shard_index: int, fingerprint: str) -> str:
    """The part (and error file) of shard ``shard_index`` of the run with ``fingerprint``."""
    return f"part-{shard_index:05d}-{fingerprint}.csv"


def piece_name(number: int) -> str:
    """A table's piece ``number`` (``worker.plan_store``)."""
    return f"piece-{number:05d}.parquet"


def summary_name(rank: int) -> str:
    return f"rank-{rank}.json"


def parse_part(name: str) -> tuple[int, str | None] | None:
    """``(shard index, fingerprint)`` of a part or error file name (fingerprint None in names of
    older workers); None for any other file.
    """
    m = PART_FILE.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def image_id(uri: str) -> str:
    """The object's stem, as the reference system writes it."""
    return PurePosixPath(uri.rsplit("/", 1)[-1]).stem


def encode_rows(header: tuple[str, ...], rows: Iterable[tuple]) -> bytes:
    """A part or error file: CSV with a header line and LF line ends, in UTF-8.

    The bytes are ``csv.writer``'s. Rows whose cells are all text that needs no quoting are
    joined directly: the csv module copies every character one by one, under the GIL, which for
    an embedding part (kilobytes of base64 a row) took a quarter of the GPU worker's loop.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        if all(type(cell) is str and cell and not _NEEDS_QUOTES.search(cell) for cell in row):
            buf.write(",".join(row) + "\n")
        else:
            writer.writerow(row)
    return buf.getvalue().encode("utf-8")


# What makes csv.writer (QUOTE_MINIMAL, "," and '"', LF lines) quote a text cell.
_NEEDS_QUOTES = re.compile(r'[",\r\n]')


# The run record (run.json) and the run's fingerprint.

# What a run's rows depend on: the WorkerConfig fields marked ``fingerprint`` (``device`` as the
# device type the job resolved), the model's revision, the incremental base and the plan's
# SHA-256. A record without one of them has not learnt it yet (a plan made before the model loaded).
FINGERPRINT_KEYS = (*FINGERPRINTED, "model_revision", "base", "plan_sha256")
# What a run's labels depend on: its fingerprint less how its plan was made and cut. An
# incremental run reuses the rows of a base run only where the base agrees on every one of these
# that both records hold (a base aggregated before a key was recorded is not held to it).
LABEL_KEYS = (*(k for k in FINGERPRINTED if k not in ("shard_size", "incremental")), "model_revision")
# Hex digits of the fingerprint in part names: 64 bits, so two runs at one OUTPUT never share one.
FINGERPRINT_DIGITS = 16


class MixedResultsError(ValueError):
    """A results prefix holds parts that were not computed for its run record, or a record and
    plan that do not belong together; the message names them.
    """


def run_record(input_uri: str, model: str, *, incremental: bool, base: str | None = None, **facts) -> dict:
    """What a run's plan was made from: its input and model, and for incremental runs its base
    run and the counts of the difference (``facts``; settings and the plan's digest go here too).
    """
    return {"input": input_uri, "model": model, "incremental": incremental, "base": base, **facts}


def plan_digest(plan_bytes: bytes) -> str:
    """The SHA-256 of the plan's index (``plan_sha256`` of the record), which holds every piece's."""
    return hashlib.sha256(plan_bytes).hexdigest()


def fingerprint_of(record: dict) -> str:
    """The digest of the record's ``FINGERPRINT_KEYS``, as part names carry it.

    Keys the record lacks are left out, not taken as null: a record sealed before a key existed
    (the task's parameters came later) keeps the fingerprint it was sealed with. ``sealed``
    requires every key, so a worker's record never lacks one.
    """
    canonical = json.dumps(
        {k: record[k] for k in FINGERPRINT_KEYS if k in record}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:FINGERPRINT_DIGITS]


def sealed(record: dict) -> dict:
    """The record with its ``fingerprint``: what a worker writes before any rank reads an image.

    Raises:
        ValueError: The record lacks one of ``FINGERPRINT_KEYS``.
    """
    missing = [k for k in FINGERPRINT_KEYS if k not in record]
    if missing:
        raise ValueError(f"a run record needs {', '.join(missing)} before it is sealed")
    return {**record, "fingerprint": fingerprint_of(record)}


def differences(recorded: dict, current: dict, keys: Sequence[str] = FINGERPRINT_KEYS) -> str:
    """What differs between two records, over the ``keys`` both have, in one line ("" if nothing)."""
    return "; ".join(
        f"{key} was {_shown(recorded[key])}, now {_shown(current[key])}"
        for key in keys
        if key in recorded and key in current and recorded[key] != current[key]
    )


def _shown(value: object) -> str:
    text = str(value)
    # Digests are told apart by their first digits; 12 keep the line short.
    digest = re.fullmatch(r"((?:sha256|hub):)?([0-9a-f]{12})[0-9a-f]{20,}", text)
    return f"{digest.group(1) or ''}{digest.group(2)}..." if digest else text


def check_parts(results_uri: str, record: dict, plan_sha256: str, part_uris: Iterable[str]) -> None:
    """Check that the record was made with this plan and that every part was computed for it.

    A record that no worker has sealed (the launcher planned an incremental run that found
    nothing to classify, so no job ran) is fine as long as no part claims it.

    Args:
        results_uri: The results prefix (for the messages).
        record: Its ``run.json``.
        plan_sha256: The SHA-256 of its plan's index (``plan/index.json``).
        part_uris: The part files found under ``parts/``.

    Raises:
        MixedResultsError: The record was made for another plan (or has a fingerprint that
            does not match it), or some part carries another fingerprint than the record's;
            the message names the first such parts.
    """
    run_uri = join(results_uri, RUN_FILE)
    if record.get("plan_sha256") != plan_sha256:
        recorded = record.get("plan_sha256")
        raise MixedResultsError(
            f"{join(results_uri, PLAN_FILE)} (sha256 {_shown(plan_sha256)}) is not the plan {run_uri} "
            + (f"was made with (sha256 {_shown(recorded)})" if recorded else "records (it names no plan)")
        )
    fingerprint = record.get("fingerprint")
    if fingerprint is not None and fingerprint != fingerprint_of(record):
        raise MixedResultsError(f"{run_uri} does not match its own fingerprint {fingerprint}: it was edited")
    foreign = [u for u in part_uris if (parse_part(u.rsplit("/", 1)[-1]) or (0, None))[1] != fingerprint]
    if foreign:
        whose = f"fingerprint {fingerprint}" if fingerprint else "which no worker has sealed"
        raise MixedResultsError(
            f"{len(foreign)} part(s) under {join(results_uri, PARTS_DIR)} were computed for another run "
            f"than {run_uri} ({whose}): {', '.join(sorted(foreign)[:5])}; rerun the worker with "
            "--overwrite to replace them"
        )


def write_run_record(results_uri: str, record: dict, *, project: str | None = None) -> None:
    """Write ``run.json``, replacing any record there (``worker.fingerprint`` decides when)."""
    open_storage(results_uri, project=project).write(
        join(results_uri, RUN_FILE), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")
    )


def read_run_record(results_uri: str, *, project: str | None = None) -> dict:
    """The run's ``run.json``; empty where there is none."""
    storage = open_storage(results_uri, project=project)
    uri = join(results_uri, RUN_FILE)
    try:
        return json.loads(storage.read(uri))
    except FileNotFoundError:
        return {}


# Completed runs: the marker the aggregate writes last, and the manifest beside it.


def completion_marker(results_uri: str, run: dict, metrics: dict, **facts) -> dict:
    """The marker's content: a complete run's record, metrics and manifest, and when it was aggregated."""
    return {
        "results_uri": results_uri,
        # Microseconds: incremental runs pick the latest complete run by this time.
        "aggregated_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "manifest": MANIFEST,
        "run": run,
        "metrics": metrics,
        **facts,
    }


def results_root_of(results_uri: str) -> str:
    """The folder that holds a run's results prefix and those of its sibling runs."""
    return results_uri.rstrip("/").rsplit("/", 1)[0]


@dataclass(frozen=True)
class CompletedRun:
    """A sibling run whose aggregate succeeded.

    Attributes:
        results_uri: The run's results prefix.
        marker: Its ``aggregate/metrics.json``: metrics, ``aggregated_at``, and ``run`` (its ``run.json``).
    """

    results_uri: str
    marker: dict

    @property
    def manifest_uri(self) -> str:
        return join(self.results_uri, MANIFEST)

    @property
    def input(self) -> str | None:
        return self.marker.get("run", {}).get("input")

    @property
    def model(self) -> str | None:
        return self.marker.get("run", {}).get("model")

    @property
    def incremental(self) -> bool:
        return bool(self.marker.get("run", {}).get("incremental"))


def completed_runs(results_root: str, *, project: str | None = None) -> list[CompletedRun]:
    """Every complete run directly under ``results_root`` that has a manifest, oldest first.

    Args:
        results_root: The folder whose sub-folders are runs (gs:// or local).
        project: GCP project for the GCS client.

    Returns:
        The runs in the order their aggregates finished; none if the root does not exist.
    """
    storage = open_storage(results_root, project=project)
    prefix = folder(results_root)
    try:
        listed = [o.uri for o in storage.list(prefix)]
    except FileNotFoundError:
        return []
    marker_uris = [u for u in listed if _MARKER_UNDER_ROOT.fullmatch(u[len(prefix) :])]
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        markers = list(pool.map(lambda u: json.loads(storage.read(u)), marker_uris))
    runs = [
        CompletedRun(uri[: -len(MARKER) - 1], marker)
        for uri, marker in zip(marker_uris, markers, strict=True)
        # Runs aggregated before manifests existed cannot seed an incremental run.
        if marker.get("manifest") == MANIFEST
    ]
    # ISO-8601 UTC timestamps of one format sort in time order; the URI breaks ties deterministically.
    return sorted(runs, key=lambda r: (r.marker.get("aggregated_at", ""), r.results_uri))


def read_manifest(uri: str, columns: list[str] | None = None, *, project: str | None = None) -> pd.DataFrame:
    """A run's manifest as a DataFrame (``generation`` is a nullable integer)."""
    import pandas as pd

    data = open_storage(uri, project=project).read(uri)
    return pd.read_parquet(io.BytesIO(data), columns=columns, engine="pyarrow")
