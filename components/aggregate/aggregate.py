"""aggregate: merge the worker's CSV parts, prove exactly-once, and report.

The worker writes one CSV part per shard under ``OUTPUT/parts/`` (the part is the
shard's commit point), error rows under ``OUTPUT/errors/`` and one summary per rank
under ``OUTPUT/summary/``. This module checks that every planned image appears exactly
once across parts and errors, writes the merged table as CSV and Parquet plus an HTML
report, then ``OUTPUT/aggregate/results.parquet`` (the manifest: the table with each
image's GCS generation) and finally ``OUTPUT/aggregate/metrics.json``, the success marker
that later incremental runs look for.

For an incremental run (``OUTPUT/run.json`` names a base run), the exactly-once check
covers the images this run planned, and the table is the union described in
``worker.incremental``: the base run's rows for images unchanged since, plus this run's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from components.aggregate.report import render_report
from worker.results import (
    ERROR_DTYPES,
    ERRORS_DIR,
    INVENTORY_FILE,
    MANIFEST,
    MANIFEST_COLUMNS,
    MARKER,
    PART_COLUMNS,
    PART_DTYPES,
    PART_FILE,
    PARTS_DIR,
    PLAN_FILE,
    SUMMARY_DIR,
    SUMMARY_FILE,
    completion_marker,
    decode_plan,
    read_manifest,
    read_run_record,
)
from worker.storage import ObjectInfo, Storage, folder, join, open_storage, write_text

log = logging.getLogger(__name__)

TOP_CLASSES = 20
ERRORS_SHOWN = 100
# How many offending URIs the exception message names; the report shows more.
NAMED_IN_ERROR = 5
PROBLEMS_SHOWN = 100
_READ_THREADS = 16


@dataclass
class AggregateReport:
    """Everything the HTML report and the KFP metrics show.

    Attributes:
        results_uri: The worker's output prefix that was aggregated.
        metrics: images, classified, errors, missing, duplicated, unexpected, rows, reused,
            changed, deleted, distinct_classes, images_per_second, wall_seconds, gpu_seconds, ranks.
            ``images`` to ``unexpected`` concern the images this run planned; ``rows`` is the
            merged table's size, ``reused`` of its rows come from the base run of an
            incremental run, whose ``changed`` and ``deleted`` rows were dropped.
        top_classes: ``(class, count)`` for the most frequent classes of the merged table,
            most frequent first.
        errors_sample: ``(uri, reason)`` of the first error rows by uri.
        ranks: The per-rank summaries, by rank.
        missing_sample: Planned URIs found in neither parts nor errors (first few).
        duplicated_sample: URIs found more than once (first few).
        unexpected_sample: URIs in the results that the plan does not contain (first few).
        base_uri: The base run of an incremental run, else None.
    """

    results_uri: str
    metrics: dict[str, int | float]
    top_classes: list[tuple[str, int]] = field(default_factory=list)
    errors_sample: list[tuple[str, str]] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)
    missing_sample: list[str] = field(default_factory=list)
    duplicated_sample: list[str] = field(default_factory=list)
    unexpected_sample: list[str] = field(default_factory=list)
    base_uri: str | None = None

    @property
    def complete(self) -> bool:
        """True when every planned image appears exactly once and nothing else does."""
        m = self.metrics
        return m["missing"] == 0 and m["duplicated"] == 0 and m["unexpected"] == 0


class IncompleteResultsError(RuntimeError):
    """The results do not cover the plan exactly once; ``report`` says how."""

    def __init__(self, report: AggregateReport):
        self.report = report
        m = report.metrics
        details = [
            f"first {what}: {', '.join(sample[:NAMED_IN_ERROR])}"
            for what, sample in (
                ("missing", report.missing_sample),
                ("duplicated", report.duplicated_sample),
                ("unexpected", report.unexpected_sample),
            )
            if sample
        ]
        super().__init__(
            f"results at {report.results_uri} are incomplete: {m['missing']} missing, "
            f"{m['duplicated']} duplicated, {m['unexpected']} unexpected of {m['images']} planned images"
            + ("; " + "; ".join(details) if details else "")
        )


def aggregate(results_uri: str, *, csv_path: str, parquet_path: str, html_path: str) -> AggregateReport:
    """Merge and check the worker's results, and write the table, the report, the manifest and the marker.

    The HTML report is written first, so a failed task still shows why it failed.

    Args:
        results_uri: The worker's OUTPUT prefix (gs:// or local).
        csv_path: Local file for the merged table (with an incremental run's carried-over
            rows), sorted by uri.
        parquet_path: Local file for the same table as Parquet.
        html_path: Local file for the self-contained HTML report.

    Returns:
        The metrics, top classes, error sample and rank summaries.

    Raises:
        FileNotFoundError: There is no plan under ``results_uri``, or the base run of an
            incremental run lost its manifest.
        ValueError: A part or error file does not have the documented columns.
        IncompleteResultsError: Some planned image is missing or appears more than
            once, or the results hold an image the plan does not; nothing but the
            HTML report is written then.
    """
    storage = open_storage(results_uri)
    plan_uri = join(results_uri, PLAN_FILE)
    try:
        plan_bytes = storage.read(plan_uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no plan at {plan_uri}: the worker has not run for these results") from exc
    plan = decode_plan(plan_bytes)
    planned = pd.Index(sorted({o.uri for o in plan}), dtype=str)

    part_uris = _list_named(storage, join(results_uri, PARTS_DIR), PART_FILE)
    error_uris = _list_named(storage, join(results_uri, ERRORS_DIR), PART_FILE)
    # Errors are written before their part, and the part is the commit point: an
    # error file without its part belongs to an attempt that never committed.
    committed = {u.rsplit("/", 1)[1] for u in part_uris}
    orphans = [u for u in error_uris if u.rsplit("/", 1)[1] not in committed]
    if orphans:
        log.warning("ignoring %d error files of uncommitted shards, e.g. %s", len(orphans), orphans[0])
        error_uris = [u for u in error_uris if u.rsplit("/", 1)[1] in committed]

    parts = _read_csvs(storage, part_uris, PART_DTYPES)
    errors = _read_csvs(storage, error_uris, ERROR_DTYPES)
    ranks = _read_summaries(storage, join(results_uri, SUMMARY_DIR))
    run_info = read_run_record(results_uri)
    carried, changed, deleted = _carry_over(storage, results_uri, run_info, planned)
    table = _merged_table(parts, plan, carried)

    report = _build_report(
        results_uri,
        planned,
        parts,
        errors,
        ranks,
        table,
        reused=len(carried),
        changed=changed,
        deleted=deleted,
    )
    report.base_uri = run_info.get("base")
    _write_local(html_path, render_report(report).encode("utf-8"))
    if not report.complete:
        raise IncompleteResultsError(report)

    user_table = table[list(PART_COLUMNS)]
    _write_local(csv_path, user_table.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    Path(parquet_path).parent.mkdir(parents=True, exist_ok=True)
    user_table.to_parquet(parquet_path, engine="pyarrow", index=False)
    buf = io.BytesIO()
    table.to_parquet(buf, engine="pyarrow", index=False)
    storage.write(join(results_uri, MANIFEST), buf.getvalue())

    # Written last: its presence means the results were complete and aggregated, and that the
    # manifest is there for the next incremental run.
    marker = completion_marker(
        results_uri,
        run_info,
        report.metrics,
        plan_sha256=hashlib.sha256(plan_bytes).hexdigest(),
        parts=len(part_uris),
    )
    write_text(join(results_uri, MARKER), json.dumps(marker, indent=2, sort_keys=True) + "\n")
    log.info("aggregated %s: %s", results_uri, report.metrics)
    return report


def _carry_over(
    storage: Storage, results_uri: str, run_info: dict, planned: pd.Index
) -> tuple[pd.DataFrame, int, int]:
    """The base run's rows to keep: those whose object is still listed at the same generation.

    Returns:
        The rows (manifest columns), and how many base rows were dropped because their
        object changed or was deleted; no rows and zeros without a base run.
    """
    base = run_info.get("base")
    if not base:
        return _empty(dict(zip(MANIFEST_COLUMNS, (*PART_DTYPES.values(), "Int64"), strict=True))), 0, 0
    inventory = decode_plan(storage.read(join(results_uri, run_info.get("inventory", INVENTORY_FILE))))
    current = pd.Series({o.uri: o.generation for o in inventory}, dtype="Int64")
    try:
        rows = read_manifest(join(base, MANIFEST))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"the base run {base} of this incremental run has no manifest any more "
            f"({MANIFEST}); rerun with incremental off"
        ) from exc
    present = rows["uri"].isin(current.index)
    now = current.reindex(rows["uri"]).set_axis(rows.index)
    same = (rows["generation"].astype("Int64") == now).fillna(False).astype(bool)
    # A planned image's row from this run is its latest result; the plan already excludes
    # unchanged images, so this only matters for rows without a generation.
    keep = same & ~rows["uri"].isin(planned)
    return rows[keep].reset_index(drop=True), int((present & ~same).sum()), int((~present).sum())


def _merged_table(parts: pd.DataFrame, plan: list[ObjectInfo], carried: pd.DataFrame) -> pd.DataFrame:
    """This run's rows with the generation each image was read at, plus the carried-over rows, by uri."""
    generation = {o.uri: o.generation for o in plan}
    new = parts.assign(generation=pd.array([generation.get(u) for u in parts["uri"]], dtype="Int64"))
    table = pd.concat([new, carried[list(MANIFEST_COLUMNS)]], ignore_index=True) if len(carried) else new
    return table.sort_values("uri", kind="stable", ignore_index=True)


def _empty(dtypes: dict) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})


def _list_named(storage: Storage, directory: str, pattern: re.Pattern) -> list[str]:
    """The files directly in ``directory`` whose name matches ``pattern``, sorted; none if it is absent."""
    prefix = folder(directory)
    try:
        listed = [o.uri for o in storage.list(prefix)]
    except FileNotFoundError:
        return []
    return sorted(u for u in listed if pattern.fullmatch(u[len(prefix) :]))


def _read_all(storage: Storage, uris: Sequence[str]) -> list[bytes]:
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return list(pool.map(storage.read, uris))


def _read_csvs(storage: Storage, uris: Sequence[str], dtypes: dict) -> pd.DataFrame:
    """Concatenate CSV files that must all have exactly the columns of ``dtypes``."""
    columns = list(dtypes)
    frames = []
    for uri, data in zip(uris, _read_all(storage, uris), strict=False):
        if not data.strip():
            continue  # An empty file is an empty shard, not a malformed one.
        try:
            # keep_default_na=False: a label or image id such as "NA" or "null" is data.
            frame = pd.read_csv(io.BytesIO(data), dtype=dtypes, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as exc:
            raise ValueError(f"cannot parse {uri}: {exc}") from exc
        if list(frame.columns) != columns:
            raise ValueError(f"{uri} has columns {list(frame.columns)}, expected {columns}")
        frames.append(frame)
    if frames:
        return pd.concat(frames, ignore_index=True)
    return _empty(dtypes)


def _read_summaries(storage: Storage, directory: str) -> list[dict]:
    uris = _list_named(storage, directory, SUMMARY_FILE)
    return sorted((json.loads(data) for data in _read_all(storage, uris)), key=lambda s: s.get("rank", 0))


def _build_report(
    results_uri: str,
    planned: pd.Index,
    parts: pd.DataFrame,
    errors: pd.DataFrame,
    ranks: list[dict],
    table: pd.DataFrame,
    *,
    reused: int,
    changed: int,
    deleted: int,
) -> AggregateReport:
    seen = pd.concat([parts["uri"], errors["uri"]], ignore_index=True)
    counts = seen.value_counts()
    repeated = counts[counts > 1]
    missing = planned.difference(pd.Index(counts.index, dtype=str))
    unexpected = pd.Index(counts.index, dtype=str).difference(planned)

    seconds = [float(s.get("seconds", 0.0)) for s in ranks]
    wall = max(seconds, default=0.0)
    metrics: dict[str, int | float] = {
        "images": len(planned),
        "classified": len(parts),
        "errors": len(errors),
        "missing": len(missing),
        # Extra rows beyond the one each image should have.
        "duplicated": int((repeated - 1).sum()),
        "unexpected": len(unexpected),
        "rows": len(table),
        "reused": reused,
        "changed": changed,
        "deleted": deleted,
        "distinct_classes": int(table["classification"].nunique()),
        # The job's wall time is that of its slowest rank.
        "images_per_second": len(planned) / wall if wall > 0 else 0.0,
        "wall_seconds": wall,
        "gpu_seconds": sum(s for s, r in zip(seconds, ranks, strict=False) if r.get("device") == "cuda"),
        "ranks": len(ranks),
    }
    top = table["classification"].value_counts()
    top = top.sort_index(kind="stable").sort_values(ascending=False, kind="stable").head(TOP_CLASSES)
    errors_sorted = errors.sort_values("uri", kind="stable").head(ERRORS_SHOWN)
    return AggregateReport(
        results_uri=results_uri,
        metrics=metrics,
        top_classes=[(str(k), int(v)) for k, v in top.items()],
        errors_sample=list(
            zip(errors_sorted["uri"].tolist(), errors_sorted["reason"].tolist(), strict=False)
        ),
        ranks=ranks,
        missing_sample=missing[:PROBLEMS_SHOWN].tolist(),
        duplicated_sample=sorted(repeated.index)[:PROBLEMS_SHOWN],
        unexpected_sample=unexpected[:PROBLEMS_SHOWN].tolist(),
    )


def _write_local(path: str, data: bytes) -> None:
    # KFP creates artifact folders lazily on some launchers; do not rely on it.
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
