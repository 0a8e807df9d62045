"""Stage 1 without torchrun: the plan's broadcast shape."""

from __future__ import annotations

import pickle

from worker.plan import PlanColumns
from worker.storage import ObjectInfo


def test_plan_columns_survive_pickling_and_index_like_the_plan():
    plan = [ObjectInfo(f"/d/{i:04d}.jpg", i, None if i % 2 else i * 7) for i in range(1000)]
    columns = pickle.loads(pickle.dumps(PlanColumns.of(plan)))
    assert len(columns) == len(plan)
    assert list(columns) == plan
    assert columns[7] == plan[7] and columns[-1] == plan[-1]
    assert columns[990:1010] == plan[990:1010] and columns[5:5] == []
