"""The cluster/ setup: schema-valid, wired to each other, one overlay per job kind, least-privilege RBAC.

Kueue and Trainer objects are checked against their CRD schemas from the controllers' Go modules (unknown
fields rejected), built-in kinds against Kubernetes' own strict schemas (``kubernetes-validate``).
Each overlay is rendered as ``kubectl apply -k`` would (checked against ``kubectl kustomize``
itself); its Roles are checked against the brief (exact verbs) here. On a real API server
(``tests/cluster/``) the launcher runs as the overlay's own service account, so a missing grant
fails there.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from components.launch.kubernetes.kinds import DEFAULT_JOB_KIND, JOB_KINDS, JobConfig, job_kind
from tests.support import ROOT
from tests.support.control_plane import build
from tests.support.job_pods import TRAINING_RUNTIME
from tests.support.kustomize import rendered
from tests.support.schemas import (
    assert_valid_for_crd,
    assert_valid_for_kubernetes,
    crd_schema,
    pod_template_resource,
)

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
CRD_FILES = {
    "ResourceFlavor": "kueue.x-k8s.io_resourceflavors.yaml",
    "ClusterQueue": "kueue.x-k8s.io_clusterqueues.yaml",
    "LocalQueue": "kueue.x-k8s.io_localqueues.yaml",
    "AdmissionCheck": "kueue.x-k8s.io_admissionchecks.yaml",
    "ProvisioningRequestConfig": "kueue.x-k8s.io_provisioningrequestconfigs.yaml",
    "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml",
}
READ_ONLY_GRANTS = (
    {("", resource, verb) for resource in ("pods", "pods/log") for verb in ("get", "list", "watch")}
    | {("kueue.x-k8s.io", "workloads", verb) for verb in ("get", "list", "watch")}
    | {("kueue.x-k8s.io", "localqueues", "get")}
    | {("autoscaling.x-k8s.io", "provisioningrequests", verb) for verb in ("get", "list")}
)


def kind_grants(kind: str) -> set[tuple[str, str, str]]:
    resource = job_kind(kind).resource
    return {(resource.group, resource.plural, verb) for verb in ("create", "get", "list", "watch", "delete")}


def manifest_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_all() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    matches = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def role_grants(roles: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for role in roles
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


OVERLAYS = {kind: CLUSTER / "overlays" / kind for kind in JOB_KINDS}


# -- schemas and layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, doc",
    load_all(),
    ids=lambda v: (
        str(v.relative_to(CLUSTER))
        if isinstance(v, Path)
        else f"{v['kind']}/{v['metadata']['name']}"
        if isinstance(v, dict)
        else str(v)
    ),
)
def test_every_manifest_is_schema_valid(path, doc, crds_dir):
    if doc["kind"] in CRD_FILES:
        version = doc["apiVersion"].split("/", 1)[1]
        assert_valid_for_crd(doc, crd_schema(crds_dir, CRD_FILES[doc["kind"]], version))
    else:
        assert_valid_for_kubernetes(doc)


def test_the_training_runtimes_pod_is_valid_for_kubernetes():
    runtime = yaml.safe_load(TRAINING_RUNTIME.read_text())
    for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        assert_valid_for_kubernetes(pod_template_resource(job["template"]["spec"]["template"]))


def test_custom_resources_use_their_storage_version(crds_dir):
    for kind, filename in CRD_FILES.items():
        crd = yaml.safe_load((crds_dir / filename).read_text())
        storage = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
        used = {doc["apiVersion"] for _, doc in load_all() if doc["kind"] == kind}
        assert used == {f"{crd['spec']['group']}/{storage}"}, kind


def test_namespaced_objects_name_their_namespace_and_cluster_scoped_ones_do_not():
    for path, doc in load_all():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{path.name}: {doc['kind']} is cluster-scoped"
        else:
            assert namespace, f"{path.name}: {doc['kind']} {doc['metadata']['name']} has no namespace"


@pytest.mark.parametrize(
    "kustomization",
    sorted(CLUSTER.rglob("kustomization.yaml")),
    ids=lambda p: str(p.parent.relative_to(CLUSTER)),
)
def test_kustomizations_list_exactly_the_files_beside_them(kustomization):
    spec = yaml.safe_load(kustomization.read_text())
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
    assert "namespace" not in spec  # it would be stamped onto the cluster-scoped Kueue objects too
    beside = {p.name for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
    files = {entry for entry in spec["resources"] if not (kustomization.parent / entry).is_dir()}
    assert files == beside
    for entry in set(spec["resources"]) - files:
        assert (kustomization.parent / entry / "kustomization.yaml").exists(), entry


def test_every_kind_has_an_overlay_and_the_default_is_the_default_kind():
    assert {p.name for p in (CLUSTER / "overlays").iterdir()} == set(JOB_KINDS)
    assert yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())["resources"] == [
        f"overlays/{DEFAULT_JOB_KIND}"
    ]


@pytest.mark.parametrize("directory", [CLUSTER, *OVERLAYS.values()], ids=lambda p: str(p.relative_to(ROOT)))
def test_kubectl_kustomize_renders_what_the_tests_check(directory):
    kubectl = build() / "kubectl"  # the cluster tier's own, at the server's version (cached)
    done = subprocess.run(
        [str(kubectl), "kustomize", str(directory)], capture_output=True, text=True, check=True
    )

    def key(doc: dict) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(yaml.safe_load_all(done.stdout), key=key) == sorted(rendered(directory), key=key)


# -- Kueue + DWS wiring -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_kueue_objects_reference_each_other_and_match_the_job_defaults(kind):
    docs = rendered(OVERLAYS[kind])
    defaults = JobConfig(name="x", image="i", worker_args=[])
    local_queue = one(docs, "LocalQueue", defaults.queue)
    assert local_queue["metadata"]["namespace"] == defaults.namespace == NAMESPACE
    cluster_queue = one(docs, "ClusterQueue", local_queue["spec"]["clusterQueue"])
    assert cluster_queue["spec"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
    }
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert "nvidia.com/gpu" in group["coveredResources"]
    for flavor in group["flavors"]:
        one(docs, "ResourceFlavor", flavor["name"])
        assert {r["name"] for r in flavor["resources"]} == set(group["coveredResources"])
    check_names = [c["name"] for c in cluster_queue["spec"]["admissionChecksStrategy"]["admissionChecks"]]
    assert check_names == ["dws-prov"]
    check = one(docs, "AdmissionCheck", "dws-prov")
    assert check["spec"]["controllerName"] == "kueue.x-k8s.io/provisioning-request"
    parameters = check["spec"]["parameters"]
    assert (parameters["apiGroup"], parameters["kind"]) == ("kueue.x-k8s.io", "ProvisioningRequestConfig")
    config = one(docs, "ProvisioningRequestConfig", parameters["name"])["spec"]
    assert config["provisioningClassName"] == "queued-provisioning.gke.io"
    assert config["managedResources"] == ["nvidia.com/gpu"]
    assert (
        config["podSetMergePolicy"] == "IdenticalWorkloadSchedulingRequirements"
    )  # PyTorchJob's two PodSets
    one(docs, "ServiceAccount", defaults.service_account)
    one(docs, "Namespace", NAMESPACE)


def test_only_the_trainjob_overlay_installs_a_runtime_and_it_is_the_one_trainjobs_name():
    for kind, overlay in OVERLAYS.items():
        runtimes = of_kind(rendered(overlay), "TrainingRuntime")
        if kind == "trainjob":
            (runtime,) = runtimes
            ref = job_kind(kind).build(JobConfig(name="x", image="i", worker_args=[]))["spec"]["runtimeRef"]
            assert (ref["kind"], ref["name"]) == (runtime["kind"], runtime["metadata"]["name"])
        else:
            assert runtimes == []


# -- RBAC ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", JOB_KINDS)
def test_rbac_is_namespaced_only_with_exactly_the_launchers_verbs_for_its_kind(kind):
    docs = rendered(OVERLAYS[kind])
    assert not {doc["kind"] for doc in docs} & {"ClusterRole", "ClusterRoleBinding"}
    roles = of_kind(docs, "Role")
    assert {role["metadata"]["namespace"] for role in roles} == {NAMESPACE}
    assert role_grants(roles) == READ_ONLY_GRANTS | kind_grants(kind)
    assert not any(
        "*" in value
        for role in roles
        for rule in role["rules"]
        for key in ("apiGroups", "resources", "verbs")
        for value in rule[key]
    )
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(b["roleRef"]["name"] for b in bindings) == sorted(r["metadata"]["name"] for r in roles)
    launcher = one(docs, "ServiceAccount", "batch-inference-launcher")
    for binding in bindings:
        assert binding["metadata"]["namespace"] == NAMESPACE
        assert (
            binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
            and binding["roleRef"]["kind"] == "Role"
        )
        assert {s["kind"] for s in binding["subjects"]} == {"ServiceAccount"}
        assert {
            "kind": "ServiceAccount",
            "name": "batch-inference-launcher",
            "namespace": launcher["metadata"]["namespace"],
        } in binding["subjects"]
