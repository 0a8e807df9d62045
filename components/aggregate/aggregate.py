"""aggregate: merge the worker's CSV parts, prove exactly-once, and report, in bounded memory.

The worker writes one CSV part per shard under ``OUTPUT/parts/`` (the part is the
shard's commit point), error rows under ``OUTPUT/errors/`` and one summary per rank
under ``OUTPUT/summary/``. This module checks that every planned image appears exactly
once across parts and errors, writes the merged table as CSV and Parquet, the error rows as
CSV, and an HTML report, then ``OUTPUT/aggregate/results.parquet`` (the manifest: the table
with each image's GCS generation) and finally ``OUTPUT/aggregate/metrics.json``, the success
marker that later incremental runs look for.

For an incremental run (``OUTPUT/run.json`` names a base run), the exactly-once check
covers the images this run planned, and the table is the union described in
``worker.incremental``: the base run's rows for images unchanged since, plus this run's.

The tables live in DuckDB (``components.aggregate.tables``), so a run of ten million images
aggregates in a task of a few GB.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.aggregate import tables
from components.aggregate.report import render_report
from components.aggregate.summary import AggregateReport
from components.launch.job_record import JobRecord
from worker.plan_store import count_over_partitions, each_partition, fetch_pieces, partitions_for, read_index
from worker.results import (
    ERRORS_DIR,
    INVENTORY_DIR,
    INVENTORY_FILE,
    MANIFEST,
    MARKER,
    PART_FILE,
    PARTS_DIR,
    PLAN_DIR,
    PLAN_FILE,
    SUMMARY_DIR,
    SUMMARY_FILE,
    check_parts,
    columns_of,
    completion_marker,
    plan_digest,
    read_run_record,
)
from worker.storage import ObjectInfo, Storage, folder, join, open_storage, write_text

log = logging.getLogger(__name__)

TOP_CLASSES = 20
# The score distribution's bins, and the reasons the errors-by-reason chart names.
SCORE_BINS = 20
REASONS_SHOWN = 20
# The numeric column whose distribution the report draws, the first of these a task's rows have.
SCORE_COLUMNS = ("score", "confidence", "probability")
ERRORS_SHOWN = 100
# How many offending URIs the exception message names; the report shows more.
NAMED_IN_ERROR = 5
PROBLEMS_SHOWN = 100


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


def aggregate(
    results_uri: str,
    *,
    csv_path: str,
    parquet_path: str,
    html_path: str,
    errors_path: str | None = None,
    job: JobRecord | None = None,
    price_per_gpu_hour: float = 0.0,
) -> AggregateReport:
    """Merge and check the worker's results, and write the tables, the report, the manifest and the marker.

    The HTML report is written first, so a failed task still shows why it failed.

    Args:
        results_uri: The worker's OUTPUT prefix (gs:// or local).
        csv_path: Local file for the merged table (with an incremental run's carried-over
            rows), sorted by uri.
        parquet_path: Local file for the same table as Parquet.
        html_path: Local file for the self-contained HTML report.
        errors_path: Local file for the error rows (uri, reason) as CSV, sorted by uri; None: not written.
        job: The launch step's job record, for the report's run and cost sections.
        price_per_gpu_hour: Price of one GPU-hour; 0: the report shows no cost.

    Returns:
        The metrics, top classes, error sample and rank summaries.

    Raises:
        FileNotFoundError: There is no plan under ``results_uri``, or the base run of an
            incremental run lost its manifest.
        MixedResultsError: A part was computed for another run than ``run.json``'s (it is
            named), or ``run.json`` was made for another plan.
        ValueError: A part or error file does not have the documented columns.
        IncompleteResultsError: Some planned image is missing or appears more than
            once, or the results hold an image the plan does not; nothing but the
            HTML report is written then.
    """
    storage = open_storage(results_uri)
    with tempfile.TemporaryDirectory(prefix="aggregate-") as tmp:
        scratch = Path(tmp)
        found = read_index(join(results_uri, PLAN_DIR))
        if found is None:
            raise FileNotFoundError(
                f"no plan at {join(results_uri, PLAN_FILE)}: the worker has not run for these results"
            )
        plan_index, index_bytes = found
        plan_sha256 = plan_digest(index_bytes)
        # The inventory of an incremental run is as large as the base run's manifest, or larger.
        inventory = read_index(join(results_uri, INVENTORY_DIR))
        partitions = partitions_for(max(plan_index.images, inventory[0].images if inventory else 0))
        plan_paths = fetch_pieces(join(results_uri, PLAN_DIR), plan_index, scratch / "plan")
        con = tables.connect(scratch)
        try:
            return _aggregate(
                con,
                storage,
                results_uri,
                scratch,
                plan_paths=plan_paths,
                plan_sha256=plan_sha256,
                partitions=partitions,
                outputs=(csv_path, parquet_path, html_path, errors_path),
                job=job,
                price_per_gpu_hour=price_per_gpu_hour,
            )
        finally:
            con.close()


def _aggregate(
    con,
    storage: Storage,
    results_uri: str,
    scratch: Path,
    *,
    plan_paths: list[Path],
    plan_sha256: str,
    partitions: int,
    outputs: tuple[str, str, str, str | None],
    job: JobRecord | None,
    price_per_gpu_hour: float,
) -> AggregateReport:
    csv_path, parquet_path, html_path, errors_path = outputs
    with _stage("plan loaded"):
        tables.load_listing(con, "plan", plan_paths, partitions)
    part_files = _list_named(storage, join(results_uri, PARTS_DIR), PART_FILE)
    run_info = read_run_record(results_uri)
    # Parts of another run (another input, model, plan...) are rejected by name, never merged.
    check_parts(results_uri, run_info, plan_sha256, [f.uri for f in part_files])
    error_files = _list_named(storage, join(results_uri, ERRORS_DIR), PART_FILE)
    # Errors are written before their part, and the part is the commit point: an
    # error file without its part belongs to an attempt that never committed.
    committed = {f.uri.rsplit("/", 1)[1] for f in part_files}
    orphans = [f for f in error_files if f.uri.rsplit("/", 1)[1] not in committed]
    if orphans:
        log.warning("ignoring %d error files of uncommitted shards, e.g. %s", len(orphans), orphans[0].uri)
        error_files = [f for f in error_files if f.uri.rsplit("/", 1)[1] in committed]
    # The task's columns, as its run record declares them: the aggregate knows no task.
    columns = columns_of(run_info)
    every = ", ".join(c.name for c in columns)
    tables.load_csv_files(con, "parts", storage, part_files, columns, partitions)
    tables.load_csv_files(con, "errors", storage, error_files, partitions=partitions)
    ranks = _read_summaries(storage, join(results_uri, SUMMARY_DIR))
    with _stage("base run's rows carried over"):
        reused, changed, deleted = _carry_over(
            con, storage, results_uri, run_info, scratch, columns, partitions
        )
    with _stage("rows merged"):
        # The result rows with each image's generation, joined a hash partition of URIs at a time.
        con.execute(f"CREATE TABLE merged AS SELECT {every}, generation FROM carried")
        each_partition(
            con,
            f"INSERT INTO merged SELECT {every}, plan.generation FROM parts_$part parts "
            "LEFT JOIN plan_$part plan USING (uri)",
            partitions,
        )
    summary = next((c.name for c in columns if c.summary), None)

    with _stage("rows checked against the plan"):
        report = _build_report(
            con, results_uri, ranks, summary, partitions, reused=reused, changed=changed, deleted=deleted
        )
    report.base_uri = run_info.get("base")
    report.run = run_info
    report.job = job
    report.price_per_gpu_hour = price_per_gpu_hour
    report.metrics.update(_cost_metrics(report))
    _write_local(html_path, render_report(report).encode("utf-8"))
    if not report.complete:
        raise IncompleteResultsError(report)

    # The CSV leaves vectors out and writes lists as JSON arrays; the Parquet holds every column.
    in_csv = ", ".join(
        f"CAST(to_json({c.name}) AS VARCHAR) AS {c.name}" if c.is_list else c.name
        for c in columns
        if c.in_csv
    )
    manifest_path = scratch / "manifest.parquet"
    with _stage("tables written"):
        tables.write_in_uri_order(
            con,
            "merged",
            report.metrics["rows"],
            [
                tables.Output(csv_path, in_csv, "csv"),
                tables.Output(parquet_path, every, "parquet", columns),
                # Vectors stay raw bytes in the manifest (compact, exact).
                tables.Output(manifest_path, "*", "parquet"),
            ],
        )
        if errors_path:
            tables.write_in_uri_order(
                con, "errors", report.metrics["errors"], [tables.Output(errors_path, "uri, reason", "csv")]
            )
    # Uploaded from the file: at 100 M rows the manifest is GBs, never held in memory.
    (failed,) = storage.upload_files([(str(manifest_path), join(results_uri, MANIFEST))], workers=1)
    if failed is not None:
        raise failed

    # Written last: its presence means the results were complete and aggregated, and that the
    # manifest is there for the next incremental run.
    marker = completion_marker(
        results_uri, run_info, report.metrics, plan_sha256=plan_sha256, parts=len(part_files)
    )
    write_text(join(results_uri, MARKER), json.dumps(marker, indent=2, sort_keys=True) + "\n")
    log.info("aggregated %s: %s", results_uri, report.metrics)
    return report


@contextmanager
def _stage(done: str) -> Iterator[None]:
    """Log how long the stage took, ``done`` saying what it did: at 100 M rows each takes minutes."""
    start = time.monotonic()
    yield
    log.info("%s in %.1fs", done, time.monotonic() - start)


def _carry_over(
    con, storage: Storage, results_uri: str, run_info: dict, scratch: Path, columns, partitions: int
) -> tuple[int, int, int]:
    """Table ``carried``: the base run's rows whose object is still listed at the same generation.

    Returns:
        How many rows are carried over, and how many base rows were dropped because their
        object changed or was deleted; zeros without a base run.
    """
    base = run_info.get("base")
    if not base:
        con.execute(f"CREATE TABLE carried ({tables.manifest_sql_columns(columns)})")
        return 0, 0, 0
    inventory_dir = join(results_uri, INVENTORY_DIR)
    found = read_index(inventory_dir)
    if found is None:
        raise FileNotFoundError(
            f"no inventory at {join(results_uri, INVENTORY_FILE)} for this incremental run"
        )
    tables.load_listing(
        con, "inventory", fetch_pieces(inventory_dir, found[0], scratch / "inventory"), partitions
    )
    manifest = scratch / "base.parquet"
    try:
        open_storage(base).download(join(base, MANIFEST), str(manifest))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"the base run {base} of this incremental run has no manifest any more "
            f"({MANIFEST}); rerun with incremental off"
        ) from exc
    con.execute("CREATE TABLE carried AS SELECT * FROM read_parquet(?) LIMIT 0", [str(manifest)])
    columns_sql = ", ".join(
        f'"{name}" {kind}' for name, kind, *_ in con.execute("DESCRIBE carried").fetchall()
    )
    tables.partitioned_table(con, "base", columns_sql, partitions)
    with tables.partitioned_insert(con, "base", partitions) as insert:
        insert(f"SELECT * FROM {tables.parquet_files([manifest])}")
    # Each of base, inventory and plan a partition at a time: at 100 M rows a join of whole
    # tables would not fit the memory limit. A planned image's row from this run is its latest
    # result; the plan already excludes unchanged images, so that only matters for rows without
    # a generation.
    base_rows, inventory = "base_$part base", "inventory_$part"
    each_partition(
        con,
        f"INSERT INTO carried SELECT base.* FROM {base_rows} JOIN {inventory} inventory "
        "ON base.uri = inventory.uri AND base.generation = inventory.generation "
        "ANTI JOIN plan_$part plan ON base.uri = plan.uri",
        partitions,
    )
    changed = count_over_partitions(
        con,
        f"SELECT count(*) FROM {base_rows} SEMI JOIN {inventory} present ON base.uri = present.uri "
        f"ANTI JOIN {inventory} same ON base.uri = same.uri AND base.generation = same.generation",
        partitions,
    )
    deleted = count_over_partitions(
        con,
        f"SELECT count(*) FROM {base_rows} ANTI JOIN {inventory} present ON base.uri = present.uri",
        partitions,
    )
    return tables.scalar(con, "SELECT count(*) FROM carried"), changed, deleted


def _list_named(storage: Storage, directory: str, pattern: re.Pattern) -> list[ObjectInfo]:
    """The files directly in ``directory`` whose name matches ``pattern``, by URI; none if it is absent."""
    prefix = folder(directory)
    try:
        listed = list(storage.list(prefix))
    except FileNotFoundError:
        return []
    return sorted((o for o in listed if pattern.fullmatch(o.uri[len(prefix) :])), key=lambda o: o.uri)


def _read_summaries(storage: Storage, directory: str) -> list[dict]:
    files = _list_named(storage, directory, SUMMARY_FILE)
    return sorted(
        (json.loads(data) for data in storage.read_many(files) if isinstance(data, bytes)),
        key=lambda s: s.get("rank", 0),
    )


def _build_report(
    con,
    results_uri: str,
    ranks: list[dict],
    summary: str | None,
    partitions: int,
    *,
    reused: int,
    changed: int,
    deleted: int,
) -> AggregateReport:
    """What the tables hold; ``summary`` is the column whose values the report counts (None: none).

    Every image's rows are counted, and the plan checked against them, a hash partition of URIs
    at a time (``worker.plan_store.each_partition``).
    """
    tables.partitioned_table(con, "seen", "uri VARCHAR, n BIGINT", partitions)
    each_partition(
        con,
        "INSERT INTO seen_$part SELECT uri, count(*) FROM "
        "(SELECT uri FROM parts_$part UNION ALL SELECT uri FROM errors_$part) GROUP BY uri",
        partitions,
    )
    # Kept as tables (usually empty), so that each anti-join runs once for its count and sample.
    for problem, rows in (
        ("missing", "plan_$part ANTI JOIN seen_$part"),
        ("unexpected", "seen_$part ANTI JOIN plan_$part"),
    ):
        tables.partitioned_table(con, problem, "uri VARCHAR", partitions)
        each_partition(con, f"INSERT INTO {problem}_$part SELECT uri FROM {rows} USING (uri)", partitions)
    count = tables.scalar
    seconds = [float(s.get("seconds", 0.0)) for s in ranks]
    wall = max(seconds, default=0.0)
    planned = count(con, "SELECT count(*) FROM plan")  # one row per URI (``worker.plan_store``)
    metrics: dict[str, int | float] = {
        "images": planned,
        "classified": count(con, "SELECT count(*) FROM parts"),
        "errors": count(con, "SELECT count(*) FROM errors"),
        "missing": count(con, "SELECT count(*) FROM missing"),
        # Extra rows beyond the one each image should have.
        "duplicated": count(con, "SELECT sum(n - 1) FROM seen WHERE n > 1"),
        "unexpected": count(con, "SELECT count(*) FROM unexpected"),
        "rows": count(con, "SELECT count(*) FROM merged"),
        "reused": reused,
        "changed": changed,
        "deleted": deleted,
        "distinct_classes": count(con, f"SELECT count(DISTINCT {summary}) FROM merged") if summary else 0,
        # The job's wall time is that of its slowest rank.
        "images_per_second": planned / wall if wall > 0 else 0.0,
        "wall_seconds": wall,
        "ranks": len(ranks),
    }
    top = (
        con.execute(
            f"SELECT {summary}, count(*) AS n FROM merged GROUP BY {summary} "
            f"ORDER BY n DESC, {summary} LIMIT {TOP_CLASSES}"
        ).fetchall()
        if summary
        else []
    )
    errors_sample = con.execute(
        f"SELECT uri, reason FROM errors ORDER BY uri LIMIT {ERRORS_SHOWN}"
    ).fetchall()
    sample = f"ORDER BY uri LIMIT {PROBLEMS_SHOWN}"
    by_reason = con.execute(
        "SELECT split_part(reason, ':', 1) AS kind, count(*) AS n FROM errors GROUP BY kind "
        f"ORDER BY n DESC, kind LIMIT {REASONS_SHOWN}"
    ).fetchall()
    score_column, histogram = _score_histogram(con)
    return AggregateReport(
        results_uri=results_uri,
        metrics=metrics,
        summary_column=summary,
        top_classes=[(str(name), int(n)) for name, n in top],
        errors_sample=[(str(uri), str(reason)) for uri, reason in errors_sample],
        ranks=ranks,
        missing_sample=tables.column(con, f"SELECT uri FROM missing {sample}"),
        duplicated_sample=tables.column(con, f"SELECT uri FROM seen WHERE n > 1 {sample}"),
        unexpected_sample=tables.column(con, f"SELECT uri FROM unexpected {sample}"),
        errors_by_reason=[(str(kind), int(n)) for kind, n in by_reason],
        score_column=score_column,
        score_histogram=histogram,
    )


def _score_histogram(con) -> tuple[str, list[tuple[float, float, int]]]:
    """The first numeric ``SCORE_COLUMNS`` column of the merged table, in ``SCORE_BINS`` equal bins."""
    numeric = ("DOUBLE", "FLOAT", "REAL", "DECIMAL", "INTEGER", "BIGINT")
    types = {name: str(kind) for name, kind, *_ in con.execute("DESCRIBE merged").fetchall()}
    column = next((c for c in SCORE_COLUMNS if types.get(c, "").startswith(numeric)), "")
    if not column:
        return "", []
    low, high = con.execute(f'SELECT min("{column}"), max("{column}") FROM merged').fetchone()
    if low is None:
        return column, []
    width = (high - low) / SCORE_BINS or 1.0
    counts = dict(
        con.execute(
            f'SELECT least(floor(("{column}" - ?) / ?)::BIGINT, {SCORE_BINS - 1}) AS bin, count(*) '
            f'FROM merged WHERE "{column}" IS NOT NULL GROUP BY bin',
            [low, width],
        ).fetchall()
    )
    bins = SCORE_BINS if high > low else 1
    return column, [(low + i * width, low + (i + 1) * width, int(counts.get(i, 0))) for i in range(bins)]


def _cost_metrics(report: AggregateReport) -> dict[str, float]:
    """GPUs, the job's times and, on GPU runs, GPU-hours and the cost they come to.

    GPU-hours are GPUs x the time the job held them: from its admission (on Kubernetes, once DWS
    provisioned its nodes; locally torchrun's start) to its end, start-up included, the wait in
    the queue for capacity not. Without those times, the launch step's wall time stands in, and
    without a job record, the slowest rank's time.
    """
    m = report.metrics
    gpus = sum(1 for r in report.ranks if r.get("device") == "cuda")
    job = report.job
    job_seconds = job.job_seconds if job else m["wall_seconds"]
    held_seconds = job.held_seconds if job and job.held_seconds is not None else job_seconds
    out: dict[str, float] = {"gpus": gpus, "job_seconds": job_seconds, "held_seconds": held_seconds}
    if job and job.queue_seconds is not None:
        out["queue_seconds"] = job.queue_seconds
    if gpus:
        out["gpu_hours"] = gpus * held_seconds / 3600.0
        if report.price_per_gpu_hour > 0:
            out["cost"] = out["gpu_hours"] * report.price_per_gpu_hour
            if m["images"]:
                out["cost_per_million_images"] = out["cost"] / m["images"] * 1e6
    return out


def _write_local(path: str, data: bytes) -> None:
    # KFP creates artifact folders lazily on some launchers; do not rely on it.
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
