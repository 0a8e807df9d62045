import os

import pytest

from worker.cores import usable_cores


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", 8), ("400000 100000", 4), ("150000 100000", 2), ("50000 100000", 1), (None, 8)],
)
def test_a_cgroup_quota_caps_the_affinity(tmp_path, eight_cores, cpu_max, expected):
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    assert usable_cores(str(path)) == expected


def test_the_affinity_caps_a_larger_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    (tmp_path / "cpu.max").write_text("1600000 100000\n")
    assert usable_cores(str(tmp_path / "cpu.max")) == 1
