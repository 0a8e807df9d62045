"""An incremental run over a changed input, through ``benchmarks.scale``'s flow and many partitions.

The benchmark's two runs (a first incremental run with no base, then one after 1 % of the images
were written again, 0.5 % deleted and 0.5 % added) run in fresh processes with partitions of a
few thousand rows, so that every join, split and range of the aggregate and of incremental
planning runs over many partitions. What the second run plans and carries over is computed here
from the synthetic names alone.
"""

from __future__ import annotations

import pytest

from benchmarks.scale import ADDED, CHANGED, DELETED, measure, synthetic_name

pytestmark = pytest.mark.slow

IMAGES = 20_000


def test_the_second_run_plans_the_changed_and_carries_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCH_INFERENCE_PARTITION_ROWS", "3000")  # 7 partitions and ranges
    stages = measure(IMAGES, tmp_path, incremental=True)["stages"]

    # The first run's error rows are every hundredth planned image, in URI order.
    in_uri_order = sorted(range(IMAGES), key=synthetic_name)
    failed = {i for position, i in enumerate(in_uri_order) if position % 100 == 99}
    deleted = {i for i in range(IMAGES + IMAGES // ADDED) if i % DELETED == 1}
    changed = {i for i in range(IMAGES) if i % CHANGED == 0}
    carried = set(range(IMAGES)) - failed - deleted - changed
    listed = IMAGES + IMAGES // ADDED - len(deleted)

    first = stages["aggregate"]
    assert (first["rows"], first["errors"], first["reused"]) == (IMAGES - len(failed), len(failed), 0)
    assert stages["incremental plan"]["images"] == listed - len(carried)
    second = stages["incremental aggregate"]
    assert second["reused"] == len(carried)
    assert second["rows"] + second["errors"] == listed
