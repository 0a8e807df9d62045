"""The pods a job manifest makes, whatever its kind: what the kind's controller would create.

A PyTorchJob and a JobSet carry their pod templates whole. A TrainJob carries pieces (image,
command, env and resources in ``spec.trainer``; the rest in ``spec.runtimePatches``) that
Kubeflow Trainer merges into its runtime's template; :func:`trainjob_pod` does that merge
over the TrainingRuntime ``cluster/`` installs, so tests see the pod the nodes would really run.
"""

from __future__ import annotations

import copy
from functools import cache

import yaml

from components.launch.kubernetes.kinds import JobConfig, job_name_for
from tests.support import ROOT

TRAINING_RUNTIME = ROOT / "cluster" / "overlays" / "trainjob" / "training-runtime.yaml"
RESULTS = "gs://results-bucket/runs/coco-val2017"


def job_config(**overrides) -> JobConfig:
    """The job of run ``run-1`` writing to ``RESULTS``, with ``overrides``."""
    values = dict(
        name=job_name_for("run-1", RESULTS),
        image="img:1",
        worker_args=["--input", "gs://b/i"],
        results_uri=RESULTS,
    )
    return JobConfig(**{**values, **overrides})


@cache
def training_runtime() -> dict:
    return yaml.safe_load(TRAINING_RUNTIME.read_text())


def _named(items: list[dict], name: str) -> dict:
    return next(item for item in items if item["name"] == name)


def trainjob_pod(trainjob: dict, runtime: dict | None = None) -> dict:
    """The pod template of a TrainJob's nodes: the runtime's, with the TrainJob's trainer and patches."""
    runtime = runtime or training_runtime()
    (patch,) = trainjob["spec"]["runtimePatches"]
    (job_patch,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    replicated = _named(runtime["spec"]["template"]["spec"]["replicatedJobs"], job_patch["name"])
    pod = copy.deepcopy(replicated["template"]["spec"]["template"])
    pod.setdefault("metadata", {})
    pod_patch = job_patch["template"]["spec"]["template"]
    for key, value in (pod_patch.get("metadata") or {}).items():
        pod["metadata"].setdefault(key, {}).update(value)
    trainer = trainjob["spec"]["trainer"]
    for key, value in pod_patch["spec"].items():
        if key == "containers":
            for container_patch in value:
                container = _named(pod["spec"]["containers"], container_patch["name"])
                container.update(
                    image=trainer["image"], command=trainer["command"], resources=trainer["resourcesPerNode"]
                )
                container["env"] = container.get("env", []) + trainer["env"]
                container["volumeMounts"] = (
                    container.get("volumeMounts", []) + container_patch["volumeMounts"]
                )
        elif isinstance(value, list):
            pod["spec"][key] = pod["spec"].get(key, []) + value
        else:
            pod["spec"][key] = value
    return pod


def pod_templates(manifest: dict) -> list[dict]:
    """Every pod template of the job (a PyTorchJob has one per replica type)."""
    kind = manifest["kind"]
    if kind == "PyTorchJob":
        return [spec["template"] for spec in manifest["spec"]["pytorchReplicaSpecs"].values()]
    if kind == "JobSet":
        return [job["template"]["spec"]["template"] for job in manifest["spec"]["replicatedJobs"]]
    if kind == "TrainJob":
        return [trainjob_pod(manifest)]
    raise ValueError(f"not a job kind: {kind}")


def worker_container(template: dict) -> dict:
    (container,) = template["spec"]["containers"]
    return container
