"""The results-prefix contract: the plan codec and the part names."""

from __future__ import annotations

import json

from worker.results import decode_plan, encode_plan, part_name, shard_of
from worker.storage import ObjectInfo


def test_plan_file_round_trips_and_stays_one_json_object_per_line():
    plan = [
        ObjectInfo('gs://b/a "quoted"\\back.jpg', 10, 1700000000000001),
        ObjectInfo("/data/été/ß.jpg", 0),
        ObjectInfo("/data/x.png", 123456789),
    ]
    data = encode_plan(plan)
    lines = data.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"uri": plan[0].uri, "size": 10, "generation": 1700000000000001},
        {"uri": "/data/été/ß.jpg", "size": 0},
        {"uri": "/data/x.png", "size": 123456789},
    ]
    assert decode_plan(data) == plan
    assert encode_plan([]) == b"" and decode_plan(b"") == []


def test_part_names_round_trip_and_temp_files_are_not_parts():
    assert [shard_of(part_name(i)) for i in (0, 7, 99999, 123456)] == [0, 7, 99999, 123456]
    assert shard_of(".part-00001.csv.abc.tmp") is None and shard_of("rank-0.json") is None
