"""The cluster/ setup manifests: schema-valid, wired to each other, and least-privilege RBAC.

Kueue objects are checked against the Kueue CRD schemas in ``shared/crds`` (unknown fields
rejected), built-in kinds against Kubernetes' own strict schemas (``kubernetes-validate``). The
Role is checked both against the brief (exact verbs) and against what the launcher really does
when run against the local API stand-in.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from components.launch.kubernetes.api import KubernetesApi
from components.launch.kubernetes.errors import JobTimedOut
from components.launch.kubernetes.kinds import JobConfig, job_name_for
from components.launch.kubernetes.pytorchjob import KIND
from components.launch.kubernetes.supervisor import run_job
from tests.support import ROOT
from tests.support.k8s_stand_in import KubeApiStandIn, Step, followed_log_of, listed_workloads
from tests.support.schemas import assert_valid_for_crd, assert_valid_for_kubernetes, crd_schema

CLUSTER = ROOT / "cluster"
NAMESPACE = "batch-inference"
CLUSTER_SCOPED = {
    "Namespace",
    "ResourceFlavor",
    "ClusterQueue",
    "AdmissionCheck",
    "ProvisioningRequestConfig",
    "ClusterRole",
    "ClusterRoleBinding",
}
KUEUE_CRD_FILES = {
    "ResourceFlavor": "kueue.x-k8s.io_resourceflavors.yaml",
    "ClusterQueue": "kueue.x-k8s.io_clusterqueues.yaml",
    "LocalQueue": "kueue.x-k8s.io_localqueues.yaml",
    "AdmissionCheck": "kueue.x-k8s.io_admissionchecks.yaml",
    "ProvisioningRequestConfig": "kueue.x-k8s.io_provisioningrequestconfigs.yaml",
}
EXPECTED_GRANTS = (
    {("kubeflow.org", "pytorchjobs", verb) for verb in ("create", "get", "list", "watch", "delete")}
    | {("", resource, verb) for resource in ("pods", "pods/log") for verb in ("get", "list", "watch")}
    | {("kueue.x-k8s.io", "workloads", verb) for verb in ("get", "list", "watch")}
    | {("kueue.x-k8s.io", "localqueues", "get")}
)


def manifest_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_all() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in load_all() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict:
    matches = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def role_grants(role: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# -- schemas -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, doc",
    load_all(),
    ids=lambda v: (
        v.name
        if isinstance(v, Path)
        else f"{v['kind']}/{v['metadata']['name']}"
        if isinstance(v, dict)
        else str(v)
    ),
)
def test_every_manifest_is_schema_valid(path, doc, crds_dir):
    if doc["apiVersion"].startswith("kueue.x-k8s.io/"):
        version = doc["apiVersion"].split("/", 1)[1]
        assert_valid_for_crd(doc, crd_schema(crds_dir, KUEUE_CRD_FILES[doc["kind"]], version))
    else:
        assert_valid_for_kubernetes(doc)


def test_kueue_objects_use_the_storage_version(crds_dir):
    for kind, filename in KUEUE_CRD_FILES.items():
        crd = yaml.safe_load((crds_dir / filename).read_text())
        storage = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
        assert {doc["apiVersion"] for doc in of_kind(kind)} == {f"kueue.x-k8s.io/{storage}"}, kind


def test_namespaced_objects_name_their_namespace_and_cluster_scoped_ones_do_not():
    for path, doc in load_all():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{path.name}: {doc['kind']} is cluster-scoped"
        else:
            assert namespace, f"{path.name}: {doc['kind']} {doc['metadata']['name']} has no namespace"


@pytest.mark.parametrize(
    "kustomization", sorted(CLUSTER.rglob("kustomization.yaml")), ids=lambda p: str(p.parent.name)
)
def test_kustomizations_list_exactly_the_files_beside_them(kustomization):
    spec = yaml.safe_load(kustomization.read_text())
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
    assert "namespace" not in spec  # it would be stamped onto the cluster-scoped Kueue objects too
    beside = {p.name for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert sorted(spec["resources"]) == sorted(beside)


# -- Kueue + DWS wiring ---------------------------------------------------------------------------------------


def test_kueue_objects_reference_each_other_and_match_the_job_defaults():
    defaults = JobConfig(name="x", image="i", worker_args=[])
    local_queue = one("LocalQueue", defaults.queue)
    assert local_queue["metadata"]["namespace"] == defaults.namespace == NAMESPACE
    cluster_queue = one("ClusterQueue", local_queue["spec"]["clusterQueue"])
    assert cluster_queue["spec"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
    }
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert "nvidia.com/gpu" in group["coveredResources"]
    for flavor in group["flavors"]:
        one("ResourceFlavor", flavor["name"])
        assert {r["name"] for r in flavor["resources"]} == set(group["coveredResources"])
    check_names = [c["name"] for c in cluster_queue["spec"]["admissionChecksStrategy"]["admissionChecks"]]
    assert check_names == ["dws-prov"]
    check = one("AdmissionCheck", "dws-prov")
    assert check["spec"]["controllerName"] == "kueue.x-k8s.io/provisioning-request"
    parameters = check["spec"]["parameters"]
    assert (parameters["apiGroup"], parameters["kind"]) == ("kueue.x-k8s.io", "ProvisioningRequestConfig")
    config = one("ProvisioningRequestConfig", parameters["name"])["spec"]
    assert config["provisioningClassName"] == "queued-provisioning.gke.io"
    assert config["managedResources"] == ["nvidia.com/gpu"]
    assert config["podSetMergePolicy"] == "IdenticalWorkloadSchedulingRequirements"
    one("ServiceAccount", defaults.service_account)
    one("Namespace", NAMESPACE)


def test_kueue_configuration_enables_the_pytorchjob_integration():
    config_map = one("ConfigMap", "kueue-manager-config")
    assert config_map["metadata"]["namespace"] == "kueue-system"
    configuration = yaml.safe_load(config_map["data"]["controller_manager_config.yaml"])
    assert configuration["apiVersion"] == "config.kueue.x-k8s.io/v1beta2"
    assert configuration["kind"] == "Configuration"
    assert "kubeflow.org/pytorchjob" in configuration["integrations"]["frameworks"]
    assert configuration["manageJobsWithoutQueueName"] is False


# -- RBAC ---------------------------------------------------------------------------------------------------------


def test_rbac_is_namespaced_only_with_exactly_the_launchers_verbs():
    kinds = {doc["kind"] for _, doc in load_all()}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    roles = of_kind("Role")
    assert len(roles) == 1
    role = roles[0]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role_grants(role) == EXPECTED_GRANTS
    assert not any(
        "*" in value
        for rule in role["rules"]
        for key in ("apiGroups", "resources", "verbs")
        for value in rule[key]
    )
    (binding,) = of_kind("RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {s["kind"] for s in binding["subjects"]} == {"ServiceAccount"}
    launcher = one("ServiceAccount", "batch-inference-launcher")
    assert {
        "kind": "ServiceAccount",
        "name": "batch-inference-launcher",
        "namespace": launcher["metadata"]["namespace"],
    } in binding["subjects"]


_RESOURCE_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/[^/]+/(?P<resource>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)


def needed_grant(request) -> tuple[str, str, str] | None:
    """The (apiGroup, resource, verb) a request needs under RBAC; None for a namespace-free path."""
    match = _RESOURCE_PATH.match(request.path)
    if not match:
        return None
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    if request.method == "POST":
        verb = "create"
    elif request.method == "DELETE":
        verb = "delete"
    elif request.query.get("watch") == "true":
        verb = "watch"
    else:
        verb = "get" if match["name"] else "list"
    return match["group"] or "", resource, verb


def test_the_role_covers_every_call_the_launcher_makes():
    results = "gs://results/runs/rbac"
    manifest = KIND.build(
        JobConfig(
            name=job_name_for("run-rbac", results),
            image="img",
            worker_args=["--input", "x"],
            results_uri=results,
        )
    )
    name = manifest["metadata"]["name"]
    grants = role_grants(one("Role", "batch-inference-launcher"))
    needed = set()
    free_paths = set()
    # A namespaced Role cannot read Namespace objects: the stand-in answers 403, as a cluster would.
    with KubeApiStandIn(namespace_read_allowed=False) as stand_in:
        stand_in.script(
            Step(
                listed_workloads,
                lambda s: (s.admit(name), s.add_pod(name, "master", 0, ["ok"], state="terminated")),
            ),
            Step(
                followed_log_of(f"{name}-master-0"),
                lambda s: s.finish(name, "Failed", "PyTorchJobFailed", "failed"),
            ),
        )
        api = KubernetesApi(stand_in.url, token="t", request_timeout_s=10)
        with pytest.raises(Exception, match="PyTorchJobFailed"):
            run_job(
                api,
                KIND,
                manifest,
                log=lambda _: None,
                poll_interval_s=0.05,
                retry_interval_s=0.02,
                timeout_s=30,
            )
        ticks = itertools.count(0, 100)
        second = KIND.build(
            JobConfig(
                name=job_name_for("run-rbac-2", results + "-2"),
                image="img",
                worker_args=[],
                results_uri=results + "-2",
            )
        )
        with pytest.raises(JobTimedOut):  # the path that deletes
            run_job(
                api,
                KIND,
                second,
                log=lambda _: None,
                poll_interval_s=0.01,
                timeout_s=150,
                clock=lambda: float(next(ticks)),
            )
        for request in stand_in.requests:
            grant = needed_grant(request)
            (needed.add(grant) if grant else free_paths.add(request.path))

    assert needed <= grants, needed - grants
    # Everything else the launcher asks is open to any authenticated identity (discovery), or
    # is allowed to be refused (the namespace read).
    assert free_paths <= {"/apis/kubeflow.org/v1", "/apis/kueue.x-k8s.io", f"/api/v1/namespaces/{NAMESPACE}"}
    # And the Role grants nothing the launcher never uses beyond the brief's read verbs.
    assert {g for g in grants if g[2] in ("create", "delete")} == {
        g for g in needed if g[2] in ("create", "delete")
    }
