"""What must be in the cluster before a job is created, each checked so that a missing one is
a one-line error naming it rather than a job that waits for ever.
"""

from __future__ import annotations

from collections.abc import Callable

from components.launch.kubernetes.api import ApiError, KubernetesApi
from components.launch.kubernetes.errors import MissingClusterResource
from components.launch.kubernetes.kinds import JobKind


def missing_api(kind: JobKind) -> MissingClusterResource:
    """The error for a cluster that does not serve the kind's API."""
    return MissingClusterResource(
        f"{kind.resource.kind} CRD ({kind.resource}) is not installed in the cluster: install {kind.provider}"
    )


def refused_namespace(kind: JobKind, namespace: str, error: ApiError) -> MissingClusterResource:
    """The error for a 403 on the job's namespace.

    The launcher's Roles are namespaced: in a namespace without them (a typo, or one cluster/ was
    not applied to) every call is refused, whether the namespace exists or not.
    """
    return MissingClusterResource(
        f"this identity may not use {kind.resource.plural} in namespace {namespace!r} "
        f"({error.message}): is the namespace right, and cluster/ applied there?"
    )


def check_prerequisites(
    api: KubernetesApi, kind: JobKind, namespace: str, queue_name: str | None, log: Callable[[str], None]
) -> None:
    """Checks the kind's API, the namespace and, for a queued job, Kueue and the LocalQueue.

    Raises:
        MissingClusterResource: Naming the first one missing.
    """
    if not api.serves(kind.resource):
        raise missing_api(kind)
    if api.namespace_exists(namespace) is False:
        raise MissingClusterResource(f"namespace {namespace!r} does not exist")
    if not queue_name:
        return
    if api.kueue_api_version() is None:
        raise MissingClusterResource(
            f"Kueue is not installed (no kueue.x-k8s.io API), but the job is labelled for LocalQueue {queue_name!r}"
        )
    try:
        found = api.get_localqueue(namespace, queue_name)
    except ApiError as e:
        log(f"cannot check LocalQueue {queue_name!r} ({e}); submitting anyway")
        return
    if found is None:
        raise MissingClusterResource(
            f"LocalQueue {queue_name!r} does not exist in namespace {namespace!r} "
            "(is Kueue installed and cluster/ applied?)"
        )
