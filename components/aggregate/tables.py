"""The aggregate's tables in DuckDB: load a run's plan, parts and errors, check and merge them.

Everything lives in an on-disk DuckDB database in a scratch folder, with a memory limit: joins
and sorts that do not fit spill to disk, so memory stays bounded whatever the run's size
(10 M images and more; ``benchmarks/aggregate_memory.py`` measures the peak). Part and error
files are parsed with pyarrow, one batch of files at a time, each checked for the documented
columns before it is appended.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from worker.results import ERROR_DTYPES, PART_DTYPES
from worker.storage import ObjectInfo, ReadError, Storage

# The contract's column types (pandas dtypes) as Arrow and SQL types.
_ARROW = {str: pa.string(), "int64": pa.int64(), "float64": pa.float64()}
_SQL_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE"}
_PART_TYPES = {name: _ARROW[kind] for name, kind in PART_DTYPES.items()}
_ERROR_TYPES = {name: _ARROW[kind] for name, kind in ERROR_DTYPES.items()}
# The manifest: a part row and the generation its image was read at (null where none).
MANIFEST_SQL_COLUMNS = ", ".join(
    [f"{name} {_SQL_TYPES[kind]}" for name, kind in _PART_TYPES.items()] + ["generation BIGINT"]
)
# Files read and parsed per batch: enough to keep the reads parallel, few enough to stay small.
_FILES_PER_BATCH = 256
# DuckDB's share of the task's memory; the rest is Python, pyarrow and the report.
MEMORY_LIMIT = os.environ.get("BATCH_INFERENCE_AGGREGATE_MEMORY", "1GB")


def _quoted(path: Path | str) -> str:
    """``path`` as a SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def connect(scratch: Path):
    """A DuckDB database in ``scratch`` that spills there past its memory limit."""
    import duckdb

    con = duckdb.connect(str(scratch / "aggregate.duckdb"))
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    con.execute(f"SET temp_directory = {_quoted(scratch / 'spill')}")
    con.execute(f"SET threads = {max(1, min(4, os.cpu_count() or 1))}")
    # Row order comes from ORDER BY alone; keeping insertion order would hold whole tables.
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")  # a task log is no terminal
    return con


def load_listing(con, table: str, paths: Sequence[Path]) -> None:
    """``table(uri, generation)`` from local copies of a plan's or inventory's pieces
    (``worker.plan_store``); none: the table is created empty.
    """
    con.execute(f"CREATE TABLE {table} (uri VARCHAR, generation BIGINT)")
    if paths:
        con.execute(
            f"INSERT INTO {table} SELECT DISTINCT uri, generation FROM read_parquet(?)",
            [[str(p) for p in paths]],
        )


def load_csv_files(con, table: str, storage: Storage, files: Sequence[ObjectInfo], *, errors: bool) -> None:
    """``table`` from result part files (``errors=False``) or error files, checked as they come.

    Raises:
        ValueError: A file cannot be parsed or lacks the documented columns; it is named.
    """
    types = _ERROR_TYPES if errors else _PART_TYPES
    columns = ", ".join(f"{name} {_SQL_TYPES[kind]}" for name, kind in types.items())
    con.execute(f"CREATE TABLE {table} ({columns})")
    for batch in _parsed_batches(storage, files, types):
        con.register("_batch", batch)
        con.execute(f"INSERT INTO {table} SELECT * FROM _batch")
        con.unregister("_batch")


def _parsed_batches(storage: Storage, files: Sequence[ObjectInfo], types: dict) -> Iterator[pa.Table]:
    for start in range(0, len(files), _FILES_PER_BATCH):
        chunk = files[start : start + _FILES_PER_BATCH]
        datas = storage.read_many(chunk)
        tables = [_parse_csv(f.uri, data, types) for f, data in zip(chunk, datas, strict=True)]
        tables = [t for t in tables if t is not None]
        if tables:
            yield pa.concat_tables(tables)


def _parse_csv(uri: str, data: bytes | ReadError, types: dict) -> pa.Table | None:
    if isinstance(data, ReadError):
        raise ValueError(f"cannot read {uri}: {data}")
    if not data.strip():
        return None  # An empty file is an empty shard, not a malformed one.
    expected = list(types)
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            # Strings are never null: a label or image id such as "NA" or "null" is data.
            convert_options=pacsv.ConvertOptions(
                column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"cannot parse {uri}: {exc}") from exc
    if table.column_names != expected:
        raise ValueError(f"{uri} has columns {table.column_names}, expected {expected}")
    return table


def scalar(con, sql: str, params: Sequence = ()) -> int:
    return con.execute(sql, list(params)).fetchone()[0] or 0


def column(con, sql: str, params: Sequence = ()) -> list:
    return [row[0] for row in con.execute(sql, list(params)).fetchall()]


def copy_to(con, query: str, path: str | Path, fmt: str) -> None:
    """Write ``query``'s rows to the local file ``path`` as ``csv`` (with a header) or ``parquet``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    options = "FORMAT PARQUET, COMPRESSION ZSTD" if fmt == "parquet" else "FORMAT CSV, HEADER, DELIMITER ','"
    con.execute(f"COPY ({query}) TO {_quoted(target)} ({options})")
