"""The plan as data: sorted on disk, written as Parquet pieces, read back one shard at a time.

A plan of a hundred million images is ~10 GB of URIs: no process may hold it whole, and no
rank needs it whole. Rank 0 streams the listing into an on-disk DuckDB table (``PlanDB``; sorts
that do not fit its memory limit spill to disk), then writes the table in plan order as pieces of
whole shards, ``OUTPUT/plan/piece-NNNNN.parquet``, one Parquet row group per shard, and last
``OUTPUT/plan/index.json`` (``TableIndex``): the image count, the shard size, and each piece's
rows and SHA-256. The index is small (a few hundred bytes per piece), so its SHA-256 is the
plan's digest (``plan_sha256``) and covers every piece. Each rank reads the index, then only the
row groups of the shards it processes (``PlanReader``): its plan memory is one piece's footer and
one shard, whatever the plan's size. An incremental run's inventory is a table of the same
form (``OUTPUT/inventory/``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from worker.cores import usable_cores
from worker.results import TABLE_INDEX, piece_name
from worker.storage import Member, ObjectInfo, Storage, join, open_storage

log = logging.getLogger(__name__)

# One column per ObjectInfo field; the member's three are null for an object of its own.
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("generation", pa.int64()),
        ("crc32c", pa.string()),
        ("archive", pa.string()),
        ("offset", pa.int64()),
        ("format", pa.string()),
    ]
)
_SQL_COLUMNS = (
    'seq BIGINT, uri VARCHAR, size BIGINT, generation BIGINT, crc32c VARCHAR, archive VARCHAR, "offset" '
    "BIGINT, format VARCHAR"
)
SELECT_COLUMNS = 'uri, size, generation, crc32c, archive, "offset", format'
# Images per piece (whole shards): a few MB each, so that a plan of 100 M images is ~1,500 objects.
PIECE_IMAGES = 65_536
# Row groups per piece at most: a footer stays small however small the shards are.
_MAX_SHARDS_PER_PIECE = 1024
# DuckDB's memory while sorting; past it, the sort spills to the scratch folder.
SORT_MEMORY = os.environ.get("BATCH_INFERENCE_PLAN_MEMORY", "512MB")
_ROWS_PER_INSERT = 100_000
# Rows per hash partition where a join or grouping of whole tables runs a partition at a time.
# DuckDB's hash joins spill, but each still needs memory in proportion to its input (a join of
# 10 M URIs failed under 100 MB), and one that outgrows its memory slows as it spills: joins of
# a few million rows stay in memory and keep the aggregate's time linear in its rows
# (benchmarks/NOTES.md). Tests set a few rows.
PARTITION_ROWS = int(os.environ.get("BATCH_INFERENCE_PARTITION_ROWS", 2_500_000))


def partitions_for(rows: int) -> int:
    """How many hash partitions (of URIs) keep each of ``rows`` rows' partitions within ``PARTITION_ROWS``."""
    return max(1, -(-rows // PARTITION_ROWS))


def partition_of(partitions: int, column: str = "uri") -> str:
    """The SQL expression of a row's partition number: its ``column``'s hash, modulo ``partitions``."""
    return f"(hash({column}) % {partitions})::UINTEGER"


def each_partition(con, sql: str, partitions: int) -> list[tuple]:
    """Run ``sql`` once per partition, with ``$part`` the partition's number; every run's rows, in order.

    Both sides of a join filtered to one partition (``WHERE part = $part``) hold the rows of
    ``1 / partitions`` of the URIs, so its memory stays bounded however large the tables are.
    """
    rows: list[tuple] = []
    for number in range(partitions):
        rows += con.execute(sql.replace("$part", str(number))).fetchall()
    return rows


def count_over_partitions(con, count_sql: str, partitions: int) -> int:
    """The sum of a ``count(...)`` query (with ``$part``, as ``each_partition``) over every partition."""
    return sum(n for (n,) in each_partition(con, count_sql, partitions))


def sql_string(value: Path | str) -> str:
    """``value`` as a SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def parquet_files(paths: Iterable[Path | str]) -> str:
    """A FROM clause's ``read_parquet`` of ``paths``, as literals (COPY takes no parameters); a
    folder named like ``key=value`` on the way adds no column.
    """
    files = ", ".join(sql_string(p) for p in paths)
    return f"read_parquet([{files}], hive_partitioning = false)"


class Split:
    """Rows split by a key into a folder of Parquet files per value, in one pass per query
    (DuckDB's partitioned COPY), under ``folder``: each value's rows are then read alone, not
    found by scanning every row again per value.
    """

    def __init__(self, con, folder: Path):
        self.con, self.root = con, folder
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.queries = itertools.count()

    def add(self, select: str, key: str) -> None:
        """``select``'s rows (a query ending in its FROM), each under the value of ``key``, an SQL
        expression of the row giving a number.
        """
        target = sql_string(self.root / str(next(self.queries)))
        self.con.execute(
            f"COPY (SELECT *, {key} AS part FROM ({select})) TO {target} (FORMAT PARQUET, PARTITION_BY (part))"
        )

    def rows(self, value: int) -> str | None:
        """A FROM clause of the rows split under ``value``; None where there are none."""
        files = sorted(self.root.glob(f"*/part={value}/*.parquet"))
        return parquet_files(files) if files else None

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def split_by_uri(con, table: str, partitions: int, scratch: Path) -> None:
    """Tables ``{table}_0`` to ``{table}_{partitions - 1}``: ``table``'s rows by hash partition of
    their URIs (``partition_of``), split in one pass (``Split``), for ``each_partition``'s
    ``{table}_$part``. Filtering the whole table once per partition would read it K times.
    """
    if partitions == 1:
        con.execute(f"CREATE OR REPLACE VIEW {table}_0 AS SELECT * FROM {table}")
        return
    split = Split(con, scratch / f"split-{table}")
    try:
        split.add(f"SELECT * FROM {table}", partition_of(partitions))
        for number in range(partitions):
            rows = split.rows(number) or f"(SELECT * FROM {table} LIMIT 0)"
            con.execute(f"CREATE OR REPLACE TABLE {table}_{number} AS SELECT * FROM {rows}")
    finally:
        split.close()


_UPLOADS_IN_FLIGHT = 8


def shards_per_piece(shard_size: int) -> int:
    return max(1, min(_MAX_SHARDS_PER_PIECE, PIECE_IMAGES // shard_size))


@dataclass(frozen=True)
class TableIndex:
    """A table's ``index.json``: what the pieces hold, in order.

    Attributes:
        images: Rows in all pieces.
        shard_size: Rows per row group (the last one of the table may hold fewer).
        shards_per_piece: Row groups per piece (the last piece may hold fewer).
        archived: Whether the rows are archive members (read by range from their archive).
        pieces: Each piece's ``name``, ``rows``, ``bytes`` and ``sha256``.
    """

    images: int
    shard_size: int
    shards_per_piece: int
    archived: bool
    pieces: tuple[dict, ...]

    def encode(self) -> bytes:
        body = {
            "images": self.images,
            "shard_size": self.shard_size,
            "shards_per_piece": self.shards_per_piece,
            "archived": self.archived,
            "pieces": list(self.pieces),
        }
        return (json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> TableIndex:
        d = json.loads(data)
        return cls(d["images"], d["shard_size"], d["shards_per_piece"], d["archived"], tuple(d["pieces"]))


def _arrow(objects: list[ObjectInfo], first_seq: int) -> pa.Table:
    members = [o.member for o in objects]
    return pa.table(
        {
            "seq": pa.array(range(first_seq, first_seq + len(objects)), pa.int64()),
            "uri": [o.uri for o in objects],
            "size": pa.array([o.size for o in objects], pa.int64()),
            "generation": pa.array([o.generation for o in objects], pa.int64()),
            "crc32c": pa.array([o.crc32c for o in objects], pa.string()),
            "archive": pa.array([m and m.archive for m in members], pa.string()),
            "offset": pa.array([m and m.offset for m in members], pa.int64()),
            "format": pa.array([m and m.format for m in members], pa.string()),
        }
    )


def objects_of(table: pa.Table | pa.RecordBatch) -> list[ObjectInfo]:
    """The rows as ``ObjectInfo``s (with their ``member`` where they are archive members)."""
    c = {name: table.column(name).to_pylist() for name in SCHEMA.names}
    out = list(map(ObjectInfo, c["uri"], c["size"], c["generation"], c["crc32c"]))
    for i, archive in enumerate(c["archive"]):
        if archive is not None:
            out[i] = out[i]._replace(member=Member(archive, c["offset"][i], c["format"][i]))
    return out


def connect_duckdb(database: Path, memory_limit: str, spill: Path):
    """An on-disk DuckDB database that spills to ``spill`` past ``memory_limit``, with a thread
    per usable core (up to 4).
    """
    import duckdb

    con = duckdb.connect(str(database))
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = {sql_string(spill)}")
    # More threads than cores time-slice, and DuckDB's workers then wait on one another.
    con.execute(f"SET threads = {min(4, usable_cores())}")
    # Row order comes from ORDER BY alone; keeping insertion order would hold whole tables.
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")  # a task log is no terminal
    return con


class PlanDB:
    """A scratch DuckDB database that takes a listing in pages and writes tables as pieces."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.con = connect_duckdb(scratch / "plan.duckdb", SORT_MEMORY, scratch / "spill")

    def close(self) -> None:
        self.con.close()

    def load(self, table: str, pages: Iterable[list[ObjectInfo]]) -> int:
        """``table`` from a listing in pages, each row numbered in listing order (``seq``); its rows."""
        self.con.execute(f"CREATE OR REPLACE TABLE {table} ({_SQL_COLUMNS})")
        pending: list[ObjectInfo] = []
        rows = 0
        for page in pages:
            pending += page
            if len(pending) >= _ROWS_PER_INSERT:
                rows += self._insert(table, pending, rows)
                pending = []
        if pending:
            rows += self._insert(table, pending, rows)
        return rows

    def keep_last_per_uri(self, table: str) -> int:
        """Drop every row of ``table`` that a later row (by ``seq``) has the URI of; how many.

        Archive members are listed in plan order, and a name listed twice (packed again after it
        changed, or held twice by one tar) is the file of its last entry. Both sides spill to disk,
        so this holds at a hundred million rows.
        """
        before = self.count(f"SELECT count(*) FROM {table}")
        self.con.execute(
            f"CREATE OR REPLACE TABLE {table} AS SELECT t.* FROM {table} t "
            f"SEMI JOIN (SELECT uri, max(seq) AS seq FROM {table} GROUP BY uri) latest USING (uri, seq)"
        )
        dropped = before - self.count(f"SELECT count(*) FROM {table}")
        if dropped:
            log.info("%d older entries of names listed again were left out of the plan", dropped)
        return dropped

    def _insert(self, table: str, objects: list[ObjectInfo], first_seq: int) -> int:
        self.con.register("_page", _arrow(objects, first_seq))
        self.con.execute(f"INSERT INTO {table} SELECT * FROM _page")
        self.con.unregister("_page")
        return len(objects)

    def load_pieces(self, table: str, paths: list[Path]) -> None:
        """``table`` from local copies of a table's pieces."""
        self.con.execute(f"CREATE OR REPLACE TABLE {table} ({_SQL_COLUMNS})")
        if paths:
            self.con.execute(
                f"INSERT INTO {table} SELECT 0, {SELECT_COLUMNS} FROM read_parquet(?)",
                [[str(p) for p in paths]],
            )

    def count(self, sql: str) -> int:
        # fetchall, not fetchone: an unfinished result would block the next streamed query.
        return self.con.execute(sql).fetchall()[0][0] or 0

    def write(
        self, query: str, dest: str, shard_size: int, *, archived: bool, project: str | None = None
    ) -> bytes:
        """Write ``query``'s rows (``SELECT_COLUMNS``, in plan order) as pieces under ``dest`` and
        return the index's bytes; the index itself is the caller's to write (it commits the table).
        """
        storage = open_storage(dest, project=project)
        per_piece = shards_per_piece(shard_size)
        piece_rows = per_piece * shard_size
        relation = self.con.sql(query)
        # DuckDB 2 renamed the streaming Arrow reader; both stream, neither materializes the result.
        stream = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
        reader = stream(min(piece_rows, 1 << 16))
        pieces: list[dict] = []
        uploads: list[Future] = []
        held: list[pa.RecordBatch] = []
        held_rows = 0
        with ThreadPoolExecutor(_UPLOADS_IN_FLIGHT, thread_name_prefix="plan-upload") as pool:

            def flush(batches: list[pa.RecordBatch]) -> None:
                table = pa.Table.from_batches(batches).cast(SCHEMA)
                name = piece_name(len(pieces))
                buf = io.BytesIO()
                pq.write_table(table, buf, row_group_size=shard_size, compression="zstd")
                data = buf.getvalue()
                pieces.append(
                    {"name": name, "rows": table.num_rows, "bytes": len(data), "sha256": _sha256(data)}
                )
                while len(uploads) >= _UPLOADS_IN_FLIGHT:
                    uploads.pop(0).result()
                uploads.append(pool.submit(storage.write, join(dest, name), data))

            for batch in reader:
                while batch.num_rows:
                    take = min(batch.num_rows, piece_rows - held_rows)
                    held.append(batch.slice(0, take))
                    held_rows += take
                    batch = batch.slice(take)
                    if held_rows == piece_rows:
                        flush(held)
                        held, held_rows = [], 0
            if held_rows:
                flush(held)
            for upload in uploads:
                upload.result()
        index = TableIndex(sum(p["rows"] for p in pieces), shard_size, per_piece, archived, tuple(pieces))
        return index.encode()


def write_table(
    dest: str,
    pages: Iterable[list[ObjectInfo]],
    shard_size: int,
    *,
    ordered: bool = False,
    project: str | None = None,
) -> bytes:
    """Sort ``pages`` by URI (unless ``ordered``) and write them as a table under ``dest``, its
    index last; returns the index's bytes. For tools and tests: the worker writes its plan's index
    itself, after the run record (``worker.fingerprint``).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="table-") as scratch:
        db = PlanDB(Path(scratch))
        try:
            db.load("listing", pages)
            query = f"SELECT {SELECT_COLUMNS} FROM listing ORDER BY {'seq' if ordered else 'uri'}"
            data = db.write(query, dest, shard_size, archived=ordered, project=project)
        finally:
            db.close()
    open_storage(dest, project=project).write(join(dest, TABLE_INDEX), data)
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_index(dest: str, *, project: str | None = None) -> tuple[TableIndex, bytes] | None:
    """A table's index and its bytes; None where there is none."""
    try:
        data = open_storage(dest, project=project).read(join(dest, TABLE_INDEX))
    except FileNotFoundError:
        return None
    return TableIndex.decode(data), data


def fetch_pieces(dest: str, index: TableIndex, scratch: Path, *, project: str | None = None) -> list[Path]:
    """Local copies of a table's pieces, each checked against the index's SHA-256.

    Raises:
        ValueError: A piece is not the one the index names (edited or replaced since).
    """
    storage = open_storage(dest, project=project)
    scratch.mkdir(parents=True, exist_ok=True)

    def fetch(piece: dict) -> Path:
        data = storage.read(join(dest, piece["name"]))
        if _sha256(data) != piece["sha256"]:
            raise ValueError(f"{join(dest, piece['name'])} is not the piece {join(dest, TABLE_INDEX)} names")
        path = scratch / piece["name"]
        path.write_bytes(data)
        return path

    with ThreadPoolExecutor(_UPLOADS_IN_FLIGHT) as pool:
        return list(pool.map(fetch, index.pieces))


def iter_table(dest: str, index: TableIndex, *, project: str | None = None) -> Iterator[list[ObjectInfo]]:
    """A table's rows in order, a row group at a time."""
    reader = PlanReader(dest, index, project=project)
    for shard in range(reader.shards):
        yield reader.objects(shard)


class _RangeFile(io.RawIOBase):
    """A read-only file over an object, each read one ranged request (``Storage.read``): Parquet
    reads a footer and a row group's column chunks, never the whole piece.
    """

    def __init__(self, storage: Storage, uri: str, size: int):
        self.storage, self.uri, self.size, self.position = storage, uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        n = min(len(buffer), max(0, self.size - self.position))
        if n:
            data = self.storage.read(self.uri, offset=self.position, length=n)
            buffer[: len(data)] = data
            n = len(data)
        self.position += n
        return n


class PlanReader:
    """A rank's view of a table: the rows of one shard at a time, read as one row group."""

    def __init__(self, dest: str, index: TableIndex, *, project: str | None = None):
        self.dest = dest
        self.index = index
        self.storage = open_storage(dest, project=project)
        self.shards = -(-index.images // index.shard_size) if index.images else 0
        self._open: tuple[int, pq.ParquetFile] | None = None

    def __len__(self) -> int:
        return self.index.images

    def _piece(self, number: int) -> pq.ParquetFile:
        if self._open is None or self._open[0] != number:
            piece = self.index.pieces[number]
            source = _RangeFile(self.storage, join(self.dest, piece["name"]), piece["bytes"])
            self._open = (number, pq.ParquetFile(source, memory_map=False, pre_buffer=True))
        return self._open[1]

    def objects(self, shard: int) -> list[ObjectInfo]:
        """The rows of shard ``shard``, in plan order."""
        if not 0 <= shard < self.shards:
            raise IndexError(f"shard {shard} is not in a plan of {self.shards} shards")
        piece, group = divmod(shard, self.index.shards_per_piece)
        return objects_of(self._piece(piece).read_row_group(group))
