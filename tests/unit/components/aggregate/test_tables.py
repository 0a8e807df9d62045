"""The aggregate's DuckDB tables read the results contract's files exactly as its own codec does."""

from __future__ import annotations

from components.aggregate import tables
from worker.results import decode_plan, encode_plan
from worker.storage import ObjectInfo


def test_a_plan_loads_as_the_contract_decodes_it(tmp_path):
    objects = [
        ObjectInfo("gs://b/a/0.jpg", 10, 1712345678901234),
        ObjectInfo('gs://b/a/"quoted" é.jpg', 11, None),
        ObjectInfo("/local/images/x.png", 12),
    ]
    path = tmp_path / "plan.jsonl"
    path.write_bytes(encode_plan(objects))
    con = tables.connect(tmp_path)

    tables.load_jsonl_listing(con, "plan", path)

    loaded = sorted(con.execute("SELECT uri, generation FROM plan").fetchall())
    assert loaded == sorted((o.uri, o.generation) for o in decode_plan(path.read_bytes()))


def test_an_empty_plan_is_an_empty_table(tmp_path):
    path = tmp_path / "plan.jsonl"
    path.write_bytes(encode_plan([]))
    con = tables.connect(tmp_path)

    tables.load_jsonl_listing(con, "plan", path)

    assert tables.scalar(con, "SELECT count(*) FROM plan") == 0
