"""The launch step's job record: what ran, where, for how long, on how many GPUs.

The launch task writes it (a small JSON artifact) and the aggregate task reads it, so the
report can say what a run was and what it cost without the launch step's parameters being
passed twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# The launch parameters the report shows beside the results: those that shape them or their cost.
RECORDED_PARAMETERS = ("incremental", "batch_size", "shard_size", "device", "extra_worker_args")
# ... and those of the backend that ran it.
BACKEND_PARAMETERS = {
    "local": ("local_nproc",),
    "kubernetes": ("job_kind", "nodes", "gpus_per_node", "accelerator", "queue", "namespace", "image"),
}


@dataclass(frozen=True)
class JobRecord:
    """One run's job.

    Attributes:
        backend: ``local`` or ``kubernetes``.
        job_name: The job's name on Kubernetes; "" for the local backend.
        images_uri: The images the run classified.
        results_uri: The run's results prefix.
        model: The model it classified with.
        parameters: The other launch parameters that shape the result or the cost
            (batch and shard size, device, nodes, GPUs per node, accelerator...).
        nodes: Nodes (pods) of the job; 1 locally; 0 when no job was needed.
        world_size: Worker processes (on Kubernetes one per GPU).
        started_at: When the launch step submitted the job (ISO 8601, UTC).
        finished_at: When the job had ended.
        job_seconds: ``finished_at - started_at``: the launch step's wall time, the job's wait for
            capacity and start-up included.
        admitted_at: When the job got its GPUs: on Kubernetes its admission (once DWS provisioned
            its nodes), locally torchrun's start; "" when unknown (no job ran, or one adopted running
            whose admission the cluster did not tell).
        ended_at: When the job ended; "" when unknown.
        held_seconds: The time the job held its GPUs, start-up included, the wait for capacity
            not: ``ended_at - admitted_at``, less any time evicted and waiting to be readmitted;
            None when unknown.
        queue_seconds: ``admitted_at - started_at`` on Kubernetes: the wait in the Kueue queue
            for capacity; None locally or when unknown.
    """

    backend: str
    job_name: str
    images_uri: str
    results_uri: str
    model: str
    parameters: dict
    nodes: int
    world_size: int
    started_at: str
    finished_at: str
    job_seconds: float
    admitted_at: str
    ended_at: str
    held_seconds: float | None
    queue_seconds: float | None

    def write(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> JobRecord:
        """The record in the file ``path``.

        Raises:
            ValueError: The file is not a job record.
        """
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not names <= set(data):
            raise ValueError(f"{path} is not a job record: expected the keys {sorted(names)}")
        return cls(**{name: data[name] for name in names})


def record_job(request, result, started: datetime, finished: datetime) -> JobRecord:
    """The record of a finished launch.

    Args:
        request: The ``LaunchRequest`` that was launched.
        result: Its ``LaunchResult``.
        started: When the launch began (UTC).
        finished: When it returned.

    Returns:
        The record.
    """
    names = RECORDED_PARAMETERS + BACKEND_PARAMETERS.get(result.backend, ())
    parameters = {name: getattr(request, name) for name in names}
    admitted, ended = result.admitted_at, result.ended_at
    held = result.held_seconds
    if held is None and admitted and ended:
        held = _seconds(admitted, ended)
    elif held is not None:
        held = round(held, 3)
    queued = _seconds(started, admitted) if admitted and result.backend == "kubernetes" else None
    return JobRecord(
        backend=result.backend,
        job_name=result.job_name,
        images_uri=request.images_uri,
        results_uri=result.results_uri,
        model=request.model,
        parameters=parameters,
        nodes=result.nodes,
        world_size=result.world_size,
        started_at=_iso(started),
        finished_at=_iso(finished),
        job_seconds=_seconds(started, finished),
        admitted_at=_iso(admitted) if admitted else "",
        ended_at=_iso(ended) if ended else "",
        held_seconds=held,
        queue_seconds=queued,
    )


def _seconds(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds(), 3)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
