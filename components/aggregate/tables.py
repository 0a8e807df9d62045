"""The aggregate's tables in DuckDB: load a run's plan, parts and errors, check and merge them.

Everything lives in an on-disk DuckDB database in a scratch folder, with a memory limit: joins
and sorts that do not fit spill to disk, so memory stays bounded whatever the run's size
(10 M images and more; ``benchmarks/scale.py`` measures the peak). Part and error
files are parsed with pyarrow, one batch of files at a time, each checked for the documented
columns before it is appended.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from worker.plan_store import Split, connect_duckdb, parquet_files, partition_of, partitions_for, sql_string
from worker.results import ERROR_DTYPES
from worker.schema import VECTOR_NUMPY, Column
from worker.storage import ObjectInfo, ReadError, Storage

log = logging.getLogger(__name__)

# The contract's column types as Arrow and SQL types. Vectors stay raw little-endian bytes in the
# tables and the manifest (compact, exact); only the user's Parquet makes them fixed-size lists.
_ARROW = {
    str: pa.string(),
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "list<string>": pa.list_(pa.string()),
    "list<int64>": pa.list_(pa.int64()),
    "list<float64>": pa.list_(pa.float64()),
    "vector<float16>": pa.binary(),
    "vector<float32>": pa.binary(),
}
_SQL_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.binary(): "BLOB",
    pa.list_(pa.string()): "VARCHAR[]",
    pa.list_(pa.int64()): "BIGINT[]",
    pa.list_(pa.float64()): "DOUBLE[]",
}
_ERROR_TYPES = {name: _ARROW[kind] for name, kind in ERROR_DTYPES.items()}
_VECTOR_ARROW = {"vector<float16>": pa.float16(), "vector<float32>": pa.float32()}


def part_types(columns: Sequence[Column]) -> dict[str, pa.DataType]:
    """The Arrow type of each part column in the tables."""
    return {c.name: _ARROW[c.kind] for c in columns}


def manifest_sql_columns(columns: Sequence[Column]) -> str:
    """The manifest's SQL columns: a part row and the generation its image was read at (null where none)."""
    return ", ".join(
        [f"{name} {_SQL_TYPES[kind]}" for name, kind in part_types(columns).items()] + ["generation BIGINT"]
    )


# Files read and parsed per batch: enough to keep the reads parallel, few enough to stay small.
_FILES_PER_BATCH = 256
# Rows per batch where the aggregate converts vectors for Parquet itself.
_PARQUET_BATCH_ROWS = 65536
# DuckDB's share of the task's memory; the rest is Python, pyarrow and the report.
MEMORY_LIMIT = os.environ.get("BATCH_INFERENCE_AGGREGATE_MEMORY", "1GB")


def connect(scratch: Path):
    """A DuckDB database in ``scratch`` that spills there past its memory limit."""
    return connect_duckdb(scratch / "aggregate.duckdb", MEMORY_LIMIT, scratch / "spill")


def partitioned_table(con, table: str, sql_columns: str, partitions: int) -> None:
    """Tables ``{table}_0`` to ``{table}_{partitions - 1}``, one per hash partition of URIs, and the
    view ``{table}`` of them all: a partition's queries read its own table alone
    (``worker.plan_store.each_partition``, ``{table}_$part``).
    """
    for number in range(partitions):
        con.execute(f"CREATE TABLE {table}_{number} ({sql_columns})")
    every = " UNION ALL ".join(f"SELECT * FROM {table}_{number}" for number in range(partitions))
    con.execute(f"CREATE VIEW {table} AS {every}")


def _split(con, name: str) -> Split:
    """A ``Split`` in a folder beside the spill folder."""
    (spill,) = column(con, "SELECT current_setting('temp_directory')")
    return Split(con, Path(spill).parent / f"split-{name}")


@contextmanager
def partitioned_insert(con, table: str, partitions: int) -> Iterator[Callable[[str], None]]:
    """A function that inserts a query's rows (``select``, ending in its FROM) into their
    partitions' tables of ``table`` (``partitioned_table``).

    With one partition each query is inserted as it comes. With more, each query's rows are split
    by partition in one pass (``worker.plan_store.Split``) and each partition's table is loaded at the end, in one
    statement: inserting every batch once per partition hashed each row K times and cost K
    transactions per batch, which at 100 M rows made loading the aggregate's slowest stage by far.
    """
    if partitions == 1:
        yield lambda select: con.execute(f"INSERT INTO {table}_0 {select}")
        return
    split = _split(con, table)
    try:
        yield lambda select: split.add(select, partition_of(partitions))
        for number in range(partitions):
            if (rows := split.rows(number)) is not None:
                con.execute(f"INSERT INTO {table}_{number} SELECT * FROM {rows}")
    finally:
        split.close()


def load_listing(con, table: str, paths: Sequence[Path], partitions: int = 1) -> None:
    """``table(uri, generation)``, partitioned (``partitioned_table``), from local copies of a
    plan's or inventory's pieces (``worker.plan_store``: one row per URI); none: empty.
    """
    partitioned_table(con, table, "uri VARCHAR, generation BIGINT", partitions)
    if paths:
        with partitioned_insert(con, table, partitions) as insert:
            insert(f"SELECT uri, generation FROM {parquet_files(paths)}")


def load_csv_files(
    con,
    table: str,
    storage: Storage,
    files: Sequence[ObjectInfo],
    columns: Sequence[Column] | None = None,
    partitions: int = 1,
) -> None:
    """``table``, partitioned (``partitioned_table``), from result part files with the task's
    ``columns``, or (``columns`` None) error files, checked as they come.

    Raises:
        ValueError: A file cannot be parsed or lacks the documented columns; it is named.
    """
    types = _ERROR_TYPES if columns is None else part_types(columns)
    kinds = {c.name: c.kind for c in columns or ()}
    sql_columns = ", ".join(f"{name} {_SQL_TYPES[kind]}" for name, kind in types.items())
    partitioned_table(con, table, sql_columns, partitions)
    progress = _LoadProgress(table, len(files))
    with partitioned_insert(con, table, partitions) as insert:
        for files_read, batch in _parsed_batches(storage, files, types, kinds):
            if batch is not None:
                con.register("_batch", batch)
                insert("SELECT * FROM _batch")
                con.unregister("_batch")
            progress.update(files_read, batch.num_rows if batch is not None else 0)
    progress.done()


class _LoadProgress:
    """Files and rows loaded, rows/s and ETA, logged every ``interval`` seconds: at 100 M rows
    loading takes tens of minutes.
    """

    def __init__(self, table: str, files: int, interval: float = 30.0, clock=time.monotonic):
        self.table, self.files, self.interval, self.clock = table, files, interval, clock
        self.start = self.last_log = clock()
        self.files_read = self.rows = 0

    def update(self, files: int, rows: int) -> None:
        self.files_read += files
        self.rows += rows
        if self.clock() - self.last_log >= self.interval:
            self.last_log = self.clock()
            log.info("%s", self.line())

    def line(self) -> str:
        seconds = max(self.clock() - self.start, 1e-9)
        left = (self.files - self.files_read) * seconds / self.files_read if self.files_read else 0.0
        return (
            f"{self.table}: {self.files_read}/{self.files} files, {self.rows} rows, "
            f"{self.rows / seconds:.0f} rows/s, ETA {left:.0f}s"
        )

    def done(self) -> None:
        log.info("%s loaded in %.1fs", self.line().rsplit(", ETA", 1)[0], self.clock() - self.start)


def _parsed_batches(
    storage: Storage, files: Sequence[ObjectInfo], types: dict, kinds: dict[str, str]
) -> Iterator[tuple[int, pa.Table | None]]:
    """Each batch of files: how many were read, and their rows (None: all empty)."""
    # Lists and vectors are text in the CSV: read as strings, then decoded.
    text_types = {
        name: pa.string() if name in kinds and kinds[name] not in ("string", "int64", "float64") else t
        for name, t in types.items()
    }
    for start in range(0, len(files), _FILES_PER_BATCH):
        chunk = files[start : start + _FILES_PER_BATCH]
        datas = storage.read_many(chunk)
        tables = [
            _decoded(f.uri, table, types, kinds)
            for f, data in zip(chunk, datas, strict=True)
            if (table := _parse_csv(f.uri, data, text_types)) is not None
        ]
        tables = [t for t in tables if t is not None]
        yield len(chunk), pa.concat_tables(tables) if tables else None


def _decoded(uri: str, table: pa.Table, types: dict, kinds: dict[str, str]) -> pa.Table:
    """The part's list cells (JSON arrays) as Arrow lists, its vector cells (base64) as bytes."""
    for i, name in enumerate(table.column_names):
        kind = kinds.get(name, "string")
        if kind.startswith("list<"):
            try:
                values = [json.loads(cell) for cell in table.column(i).to_pylist()]
                decoded = pa.array(values, type=types[name])
            except (ValueError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise ValueError(f"cannot parse {uri}: column {name} holds no {kind} ({exc})") from exc
        elif kind.startswith("vector<"):
            try:
                decoded = pa.array(
                    [base64.b64decode(cell, validate=True) for cell in table.column(i).to_pylist()]
                )
            except ValueError as exc:
                raise ValueError(f"cannot parse {uri}: column {name} holds no {kind} ({exc})") from exc
        else:
            continue
        table = table.set_column(i, name, decoded)
    return table


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


@dataclass(frozen=True)
class Output:
    """A local file ``write_in_uri_order`` writes: the ``select`` list of each row, as ``csv``
    (with a header) or ``parquet`` (with ``columns``' vectors as fixed-size lists of their type).
    """

    path: str | Path
    select: str
    fmt: str
    columns: Sequence[Column] = ()


def write_in_uri_order(con, table: str, rows: int, outputs: Sequence[Output]) -> None:
    """Write ``table``'s ``rows`` rows, sorted by URI, to every one of ``outputs``.

    The rows are sorted a range of URIs at a time (``uri_bounds``), each range once for all the
    files: DuckDB's sort needs memory in proportion to the rows it sorts (10 M rows did not sort
    under 100 MB), so a hundred million rows sorted at once would not fit the memory limit.
    """
    writers = [(_CsvOut if o.fmt == "csv" else _ParquetOut)(o) for o in outputs]
    bounds = uri_bounds(con, table, rows)
    split = _split(con, f"ranges-{table}") if bounds else None
    con.execute("SET preserve_insertion_order = true")  # a sorted range is read in its order
    try:
        if split:
            # One pass puts each row in its range; each range is then read alone.
            split.add(f"SELECT * FROM {table}", _range_of(bounds))
        for number in range(len(bounds) + 1):
            source = split.rows(number) if split else table
            if source is None:
                continue
            con.execute(f"CREATE OR REPLACE TEMP TABLE uri_range AS SELECT * FROM {source} ORDER BY uri")
            for writer in writers:
                writer.add(con, "uri_range")
        for writer in writers:
            writer.close(con, table)
    finally:
        con.execute("DROP TABLE IF EXISTS uri_range")
        con.execute("SET preserve_insertion_order = false")
        if split:
            split.close()


# URIs sampled to cut a table into ranges of about equal rows.
_RANGE_SAMPLE = 100_000


def uri_bounds(con, table: str, rows: int) -> list[str]:
    """URIs, in order, that cut ``table`` into ranges of about ``worker.plan_store.PARTITION_ROWS``
    rows (a range holds the URIs from its lower bound up to, not including, the next); none for a
    small table.
    """
    count = partitions_for(rows)
    if count == 1:
        return []
    sample = sorted(
        column(con, f"SELECT uri FROM {table} USING SAMPLE reservoir({_RANGE_SAMPLE} ROWS) REPEATABLE (25)")
    )
    return sorted({sample[len(sample) * i // count] for i in range(1, count)})


def _range_of(bounds: Sequence[str]) -> str:
    """The SQL expression of a row's range number among ``bounds`` (``uri_bounds``)."""
    cases = " ".join(f"WHEN uri < {sql_string(bound)} THEN {n}" for n, bound in enumerate(bounds))
    return f"CASE {cases} ELSE {len(bounds)} END"


class _CsvOut:
    """A CSV file written a range at a time: DuckDB writes each range, the file gets it appended."""

    def __init__(self, output: Output):
        self.output, self.target, self.ranges = output, Path(output.path), 0
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.target.unlink(missing_ok=True)

    def add(self, con, source: str) -> None:
        piece = self.target.with_name(f".{self.target.name}.range")
        header = "HEADER" if self.ranges == 0 else "HEADER false"
        con.execute(
            f"COPY (SELECT {self.output.select} FROM {source}) TO {sql_string(piece)} "
            f"(FORMAT CSV, {header}, DELIMITER ',')"
        )
        with open(self.target, "ab") as out, open(piece, "rb") as data:
            shutil.copyfileobj(data, out, 8 << 20)
        piece.unlink()
        self.ranges += 1

    def close(self, con, table: str) -> None:
        pass


class _ParquetOut:
    """A Parquet file written a batch of rows at a time, vectors made fixed-size lists."""

    def __init__(self, output: Output):
        self.output, self.target = output, Path(output.path)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.vectors = {c.name: c.kind for c in output.columns if c.is_vector}
        self.sizes: dict[str, int] = {}
        self.writer = None

    def add(self, con, source: str) -> None:
        import numpy as np
        import pyarrow.parquet as pq

        for batch in con.sql(f"SELECT {self.output.select} FROM {source}").to_arrow_reader(
            _PARQUET_BATCH_ROWS
        ):
            arrays = [
                _fixed_size_list(name, array, self.vectors[name], self.sizes, np)
                if name in self.vectors
                else array
                for name, array in zip(batch.schema.names, batch.columns, strict=True)
            ]
            table = pa.Table.from_arrays(arrays, names=batch.schema.names)
            if self.writer is None:
                self.writer = pq.ParquetWriter(str(self.target), table.schema, compression="zstd")
            self.writer.write_table(table)

    def close(self, con, table: str) -> None:
        import pyarrow.parquet as pq

        if self.writer is not None:
            self.writer.close()
            return
        # No rows: an empty file with the schema (vectors of unknown size as lists).
        empty = con.sql(f"SELECT {self.output.select} FROM {table} LIMIT 0").to_arrow_table()
        fields = [
            pa.field(f.name, pa.list_(_VECTOR_ARROW[self.vectors[f.name]])) if f.name in self.vectors else f
            for f in empty.schema
        ]
        pq.write_table(pa.schema(fields).empty_table(), str(self.target), compression="zstd")


def _fixed_size_list(name: str, array: pa.Array, kind: str, size: dict[str, int], np) -> pa.Array:
    """Raw little-endian vectors as a fixed-size list array; every row must have the same length."""
    dtype = np.dtype(VECTOR_NUMPY[kind])
    cells = array.to_pylist()
    lengths = {len(cell) for cell in cells if cell is not None}
    if (
        any(cell is None for cell in cells)
        or len(lengths | ({size[name] * dtype.itemsize} if name in size else set())) > 1
    ):
        raise ValueError(f"column {name}: the vectors differ in length (or some are missing)")
    if not cells:
        return pa.array([], type=pa.list_(_VECTOR_ARROW[kind], size.get(name, 0)))
    size.setdefault(name, lengths.pop() // dtype.itemsize)
    flat = np.frombuffer(b"".join(cells), dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=_VECTOR_ARROW[kind]), size[name])
