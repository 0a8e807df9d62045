"""cluster/ on a real API server: every object accepted, every webhook satisfied, RBAC as documented.

The session fixture has applied every overlay; these tests check what the server made of them
and what each identity may do, asked of the server itself (SelfSubjectAccessReview, and real
calls where a review could hide a mistake).
"""

from __future__ import annotations

import re

import pytest

from components.launch.kubernetes.kinds import JOB_KINDS, job_kind
from tests.support import ROOT
from tests.support.control_plane import Kube, KubeError
from tests.support.gke_player import KUEUE, LAUNCHER_SA, NAMESPACE
from tests.support.kustomize import rendered

README = ROOT / "README.md"


@pytest.mark.parametrize("overlay", [*JOB_KINDS, None], ids=[*JOB_KINDS, "cluster-root"])
def test_every_object_of_the_overlay_is_on_the_server_as_written(admin, overlay):
    directory = ROOT / "cluster" / ("overlays/" + overlay if overlay else "")
    docs = rendered(directory)
    assert docs
    for doc in docs:
        meta = doc["metadata"]
        # Applying again must be accepted as is (webhooks included) and change nothing it set.
        applied = admin.apply(doc)
        assert applied["metadata"]["name"] == meta["name"]
        for key in set(doc) - {"apiVersion", "kind", "metadata", "status"}:
            assert _contains(applied[key], doc[key]), (
                f"{doc['kind']}/{meta['name']}: the server changed .{key}"
            )


def _contains(actual, wanted) -> bool:
    """Whether the server's object holds everything the manifest set (defaults may be added)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            k in actual and _contains(actual[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(actual, list) and len(actual) == len(wanted) and all(map(_contains, actual, wanted))
    return actual == wanted or str(actual) == str(wanted)


def test_kueue_makes_the_dws_queue_active(admin):
    """The admission check finds its ProvisioningRequestConfig, so the ClusterQueue and LocalQueue go active."""

    def active(kind: str, name: str, namespace: str | None = None) -> bool:
        obj = admin.get(KUEUE, kind, name, namespace)
        return any(
            c["type"] == "Active" and c["status"] == "True"
            for c in obj.get("status", {}).get("conditions", [])
        )

    admin.wait_for("dws-prov active", lambda: active("AdmissionCheck", "dws-prov"))
    admin.wait_for("dws-cluster-queue active", lambda: active("ClusterQueue", "dws-cluster-queue"))
    admin.wait_for("dws-local-queue active", lambda: active("LocalQueue", "dws-local-queue", NAMESPACE))


def test_kueue_webhook_rejects_a_bad_cluster_queue_in_one_line(admin):
    bad = {
        "apiVersion": KUEUE,
        "kind": "ClusterQueue",
        "metadata": {"name": "bad-queue"},
        "spec": {
            "resourceGroups": [
                {
                    "coveredResources": ["nvidia.com/gpu"],
                    "flavors": [
                        {"name": "dws-flavor", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": -1}]}
                    ],
                }
            ]
        },
    }
    with pytest.raises(KubeError) as caught:
        admin.apply(bad)
    # A webhook's denial is a 403 whose message names the webhook and the field.
    assert caught.value.status == 403
    assert "denied the request" in caught.value.text and "nominalQuota" in caught.value.text


def _launcher(plane, admin) -> Kube:
    return Kube(plane.url, plane.pki, token=admin.token(LAUNCHER_SA, NAMESPACE))


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_the_launcher_identity_can_do_what_its_step_needs(plane, admin, kind):
    me = _launcher(plane, admin)
    resource = job_kind(kind).resource
    for verb in ("create", "get", "list", "watch", "delete"):
        assert me.can(verb, resource.plural, NAMESPACE, resource.group), f"cannot {verb} {resource}"
    for verb in ("get", "list", "watch"):
        assert me.can(verb, "pods", NAMESPACE)
        assert me.can(verb, "workloads", NAMESPACE, "kueue.x-k8s.io")
    assert me.can("get", "pods", NAMESPACE, subresource="log")
    assert me.can("get", "localqueues", NAMESPACE, "kueue.x-k8s.io")
    assert me.can("list", "provisioningrequests", NAMESPACE, "autoscaling.x-k8s.io")


def test_the_launcher_identity_cannot_read_secrets_create_pods_or_leave_its_namespace(plane, admin):
    me = _launcher(plane, admin)
    assert not me.can("get", "secrets", NAMESPACE)
    assert not me.can("list", "secrets", NAMESPACE)
    assert not me.can("create", "pods", NAMESPACE)
    assert not me.can("create", "pods", NAMESPACE, subresource="exec")
    assert not me.can("patch", "workloads", NAMESPACE, "kueue.x-k8s.io")
    for kind in JOB_KINDS:
        resource = job_kind(kind).resource
        assert not me.can("create", resource.plural, "default", resource.group)
        assert not me.can("update", resource.plural, NAMESPACE, resource.group)
    assert not me.can("list", "pods", "default")
    # And for real, not only as a review: the server answers 403.
    for path in (f"/api/v1/namespaces/{NAMESPACE}/secrets", "/api/v1/namespaces/default/pods"):
        with pytest.raises(KubeError) as caught:
            me.request("GET", path)
        assert caught.value.status == 403


def test_the_worker_identity_has_no_grant_at_all(plane, admin):
    worker = Kube(plane.url, plane.pki, token=admin.token("batch-inference-worker", NAMESPACE))
    assert not worker.can("list", "pods", NAMESPACE)
    assert not worker.can("get", "secrets", NAMESPACE)
    assert not worker.can("create", "jobsets", NAMESPACE, "jobset.x-k8s.io")


def vertex_bindings(user: str) -> list[dict]:
    """The RoleBindings the Vertex walk-through (docs/cluster.md) creates (its ``kubectl create rolebinding`` lines)."""
    text = README.read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    commands = re.findall(
        r"kubectl -n (\S+) create rolebinding (\S+) \\\s*\n\s*--role=(\S+) --user=\$\{VERTEX_SA\}", text
    )
    assert commands, "the docs no longer show how to bind the Vertex identity"
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        for namespace, name, role in commands
    ]


def test_the_vertex_identity_bound_as_documented_can_create_and_follow_the_job(plane, admin):
    user = "vertex-pipelines@my-project.iam.gserviceaccount.com"  # GKE maps the Google identity to this user
    for binding in vertex_bindings(user):
        admin.apply(binding)
    vertex = Kube(plane.url, plane.pki, impersonate=user)
    resource = job_kind("pytorchjob").resource  # the documented default kind
    for verb in ("create", "get", "list", "watch", "delete"):
        assert vertex.can(verb, resource.plural, NAMESPACE, resource.group), (
            f"the Vertex identity cannot {verb} {resource}"
        )
    assert vertex.can("get", "pods", NAMESPACE, subresource="log")
    assert not vertex.can("get", "secrets", NAMESPACE)
