"""Deleting a job so that its GPUs are released, and knowing when they are.

Every delete the launcher makes uses ``Background`` propagation: the job object goes at once and
the garbage collector deletes what it owns (JobSet, Jobs, pods) after it. ``Foreground`` would
keep the job until its dependents are gone, and Kubeflow Trainer v2.3 keeps re-creating a
TrainJob's JobSet while the TrainJob waits for its dependents: pods came back, outside Kueue's
admission, for minutes after a cancel, and a timeout's delete took 169 s. Gone is therefore
judged from the pods: the job object is gone and no pod of it is left that is not terminating
(a terminating pod has had its SIGTERM and is leaving its node).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from components.launch.kubernetes.api import ApiError, KubernetesApi
from components.launch.kubernetes.kinds import JobKind
from components.launch.kubernetes.pod import is_terminating

PROPAGATION = "Background"


@dataclass
class Remains:
    """What is left of a deleted job.

    Attributes:
        job: The job object still exists.
        not_terminating: Its pods that are not terminating (yet), by name.
        terminating: How many of its pods are terminating.
    """

    job: bool
    not_terminating: list[str] = field(default_factory=list)
    terminating: int = 0

    @property
    def gone(self) -> bool:
        """Nothing of the job is left but pods already stopping."""
        return not self.job and not self.not_terminating

    def describe(self, ref: str) -> str:
        """What is left, in words: the job object, its pods not terminating yet, those terminating."""
        job = f"{ref} still exists" if self.job else f"{ref} is gone"
        pods = []
        if self.not_terminating:
            pods.append(
                f"{len(self.not_terminating)} not terminating yet ({', '.join(self.not_terminating)})"
            )
        if self.terminating:
            pods.append(f"{self.terminating} terminating")
        return f"{job}; " + (f"its pods: {', '.join(pods)}" if pods else "no pod of it is left")


def remains(api: KubernetesApi, kind: JobKind, namespace: str, name: str) -> Remains:
    """What is left now of the job ``name`` and its pods."""
    try:
        api.get(kind.resource, namespace, name)
        job = True
    except ApiError as e:
        if not e.not_found:
            raise
        job = False
    pods = api.list_pods(namespace, kind.pod_selector(name))
    not_terminating = sorted(p["metadata"]["name"] for p in pods if not is_terminating(p))
    return Remains(job, not_terminating, len(pods) - len(not_terminating))


def wait_until_deleted(
    api: KubernetesApi,
    kind: JobKind,
    namespace: str,
    name: str,
    *,
    deadline: float,
    clock: Callable[[], float],
    pause: Callable[[float], object],
    retry_interval_s: float,
) -> Remains:
    """Waits until the job and every pod of it that is not terminating are gone, or ``deadline``.

    Returns:
        What is left when it returned (``gone`` unless the deadline came first).
    """
    while True:
        left = remains(api, kind, namespace, name)
        if left.gone or clock() >= deadline:
            return left
        pause(min(retry_interval_s, max(0.0, deadline - clock())))
