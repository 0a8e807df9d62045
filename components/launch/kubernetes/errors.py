"""How a Kubernetes run ends when it does not succeed: one exception per way, each message actionable."""

from __future__ import annotations

import signal


class LauncherError(RuntimeError):
    """The job did not succeed; the message says why, in terms an operator can act on."""


class MissingClusterResource(LauncherError):
    """Something the job needs is not in the cluster (the kind's CRD, the namespace or LocalQueue)."""


class AdmissionRejected(LauncherError):
    """A Kueue admission check (the DWS ProvisioningRequest) rejected the workload."""


class JobFailed(LauncherError):
    """The job ended Failed.

    Attributes:
        reason: The failure condition's reason.
        condition_message: The failure condition's message.
        log_tail: Last lines of the failing pod's log (may be empty).
        pod: The pod the tail comes from, if known.
    """

    def __init__(
        self, message: str, *, reason: str, condition_message: str, log_tail: list[str], pod: str | None
    ):
        super().__init__(message)
        self.reason = reason
        self.condition_message = condition_message
        self.log_tail = log_tail
        self.pod = pod


class JobTimedOut(LauncherError):
    """The job did not finish within the launcher's timeout (queueing included); it was deleted."""


class JobCancelled(SystemExit):
    """SIGTERM arrived (the pipeline run was cancelled); the job was deleted. Exits with 143."""

    def __init__(self, message: str):
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message
