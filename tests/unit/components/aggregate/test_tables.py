"""The aggregate's DuckDB tables read the plan's pieces exactly as the worker's plan reader does."""

from __future__ import annotations

from components.aggregate import tables
from worker.plan_store import TableIndex, fetch_pieces, iter_table, write_table
from worker.storage import ObjectInfo


def test_a_plan_loads_as_the_plan_reader_reads_it(tmp_path):
    objects = [
        ObjectInfo("gs://b/a/0.jpg", 10, 1712345678901234),
        ObjectInfo('gs://b/a/"quoted" é.jpg', 11, None),
        ObjectInfo("/local/images/x.png", 12),
    ]
    index = TableIndex.decode(write_table(str(tmp_path / "plan"), [objects], shard_size=2))
    con = tables.connect(tmp_path)

    tables.load_listing(con, "plan", fetch_pieces(str(tmp_path / "plan"), index, tmp_path / "copies"))

    loaded = sorted(con.execute("SELECT uri, generation FROM plan").fetchall())
    read = [o for page in iter_table(str(tmp_path / "plan"), index) for o in page]
    assert loaded == sorted((o.uri, o.generation) for o in read) and len(loaded) == 3


def test_an_empty_plan_is_an_empty_table(tmp_path):
    index = TableIndex.decode(write_table(str(tmp_path / "plan"), [], shard_size=2))
    con = tables.connect(tmp_path)

    tables.load_listing(con, "plan", fetch_pieces(str(tmp_path / "plan"), index, tmp_path / "copies"))

    assert tables.scalar(con, "SELECT count(*) FROM plan") == 0
