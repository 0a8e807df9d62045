"""Stage 1 without torchrun: the plan's broadcast shape."""

from __future__ import annotations

import pickle

from worker.plan import PlanColumns
from worker.storage import Member, ObjectInfo


def test_plan_columns_survive_pickling_and_index_like_the_plan():
    plan = [ObjectInfo(f"/d/{i:04d}.jpg", i, None if i % 2 else i * 7) for i in range(1000)]
    columns = pickle.loads(pickle.dumps(PlanColumns.of(plan)))
    assert len(columns) == len(plan)
    assert list(columns) == plan
    assert columns[7] == plan[7] and columns[-1] == plan[-1]
    assert columns[990:1010] == plan[990:1010] and columns[5:5] == []


def test_plan_columns_keep_archive_members_compactly():
    plan = [
        ObjectInfo(
            f"gs://b/ds/{i}.jpg",
            70 + i,
            17,
            "4waSgw==" if i % 2 else None,
            Member(f"gs://b/s{i // 3}.tar", 512 * i),
        )
        for i in range(7)
    ] + [
        ObjectInfo(
            "gs://b/ds/bad.jpg", 0, None, None, Member("gs://b/ds/packed/manifest.json", 0, "unpacked")
        )
    ]
    columns = pickle.loads(pickle.dumps(PlanColumns.of(plan)))
    assert list(columns) == plan and columns[2:5] == plan[2:5] and columns[-1] == plan[-1]
    assert columns.members.archives == [
        "gs://b/s0.tar",
        "gs://b/s1.tar",
        "gs://b/s2.tar",
        "gs://b/ds/packed/manifest.json",
    ]
