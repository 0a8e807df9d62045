"""A rank's plan memory does not grow with the plan: the regression bound of issue 25.

Rank 0 plans synthetic listings of 30,000 and 300,000 names (``benchmarks.scale``'s back-end:
nested prefixes, scattered pages) through the real planning; then a rank of 16 reads the plan
rows of every shard it is given, in a fresh process. A rank that held the whole plan (as the
broadcast ``PlanColumns`` did: ~28 MB at 300,000 images, ~9 GB at 100 M) would grow by tens of
MB between the two; a rank that reads only its shards' row groups stays flat.
"""

from __future__ import annotations

import pytest

from benchmarks.scale import RANKS, SHARD, _child

pytestmark = pytest.mark.slow


def test_a_ranks_plan_memory_stays_flat_from_30_thousand_to_300_thousand_images(tmp_path):
    plan_mib = {}
    for images in (30_000, 300_000):
        scratch = tmp_path / str(images)
        scratch.mkdir()
        out = str(scratch / "results")
        planned, _, _ = _child("plan", images, scratch, out)
        assert planned["images"] == images
        read, _, _ = _child("rank", images, scratch, out, "1")
        shards = -(-images // SHARD)
        assert read["images"] == sum(min(SHARD, images - s * SHARD) for s in range(1, shards, RANKS)), (
            "the rank read exactly its shards' rows"
        )
        plan_mib[images] = read["plan_mib"]
    assert plan_mib[300_000] <= 64, plan_mib
    assert plan_mib[300_000] - plan_mib[30_000] < 10, plan_mib
