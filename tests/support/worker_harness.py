"""Run the real worker under real torchrun, and read back what it committed."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections import Counter

from worker.plan_store import iter_table, read_index
from worker.results import PLAN_DIR
from worker.storage import join, open_storage


def run_worker(
    input_uri: str,
    output_uri: str,
    model: str,
    nproc: int,
    *extra: str,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "worker",
        "--input",
        input_uri,
        "--output",
        output_uri,
        "--model",
        model,
        "--log-interval",
        "1",
        *extra,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _csv_files(output_uri: str, folder: str) -> dict[str, list[dict]]:
    storage = open_storage(output_uri)
    prefix = join(output_uri, folder) + "/"
    try:
        objects = [o for o in storage.list(prefix) if o.uri.endswith(".csv")]
    except FileNotFoundError:
        return {}
    return {o.uri: list(csv.DictReader(io.StringIO(storage.read(o.uri).decode("utf-8")))) for o in objects}


def read_plan(output_uri: str) -> list:
    """The plan under ``output_uri``, whole (test sizes), in plan order."""
    found = read_index(join(output_uri, PLAN_DIR))
    assert found is not None, f"no plan under {output_uri}"
    return [o for page in iter_table(join(output_uri, PLAN_DIR), found[0]) for o in page]


def read_results(output_uri: str) -> tuple[list[str], list[dict], list[dict]]:
    """(planned uris, part rows, error rows)."""
    plan = [o.uri for o in read_plan(output_uri)]
    parts = [row for rows in _csv_files(output_uri, "parts").values() for row in rows]
    errors = [row for rows in _csv_files(output_uri, "errors").values() for row in rows]
    return plan, parts, errors


def assert_exactly_once(output_uri: str, expected_uris: list[str]) -> tuple[list[dict], list[dict]]:
    plan, parts, errors = read_results(output_uri)
    assert plan == sorted(expected_uris), "the plan must list every image once, sorted"
    seen = Counter(r["uri"] for r in parts) + Counter(r["uri"] for r in errors)
    duplicated = [u for u, c in seen.items() if c > 1]
    missing = sorted(set(plan) - set(seen))
    unexpected = sorted(set(seen) - set(plan))
    assert not duplicated, f"duplicated: {duplicated[:5]}"
    assert not missing, f"missing {len(missing)}: {missing[:5]}"
    assert not unexpected, f"unexpected: {unexpected[:5]}"
    return parts, errors
