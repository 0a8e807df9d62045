"""The TrainJob kind (``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer v2.3).

A TrainJob names a runtime, here the TrainingRuntime ``batch-inference-torch`` that
``cluster/overlays/trainjob`` installs (a torch runtime whose JobSet restarts the whole gang on a
failure, ``failurePolicy.maxRestarts``, and fails at once within a restart: ``backoffLimit: 0``).
The worker pod goes in piece by piece: image, command, env and resources in ``spec.trainer``;
annotations, labels, volumes and their mounts, tolerations, node selector and service account
through ``spec.runtimePatches`` (the v2.2+ field; it was ``podSpecOverrides`` in v2.0 and
``podTemplateOverrides`` in v2.1). The torch plugin injects torchrun's ``PET_*`` rendezvous
variables (and rejects a TrainJob that sets them). Trainer runs the TrainJob as a JobSet of the
same name, so the pods carry JobSet's labels. Kueue queues it through its
``trainer.kubeflow.org/trainjob`` integration, on by default since Kueue 0.14; the TrainJob has
one PodSet, which GKE queued provisioning accepts as it is.
"""

from __future__ import annotations

from typing import Any

from components.launch.kubernetes.api import Resource
from components.launch.kubernetes.jobset import REPLICATED_JOB, JobSetPods, jobset_state
from components.launch.kubernetes.kinds import (
    FAILED,
    SUCCEEDED,
    JobConfig,
    JobState,
    job_object,
    true_conditions,
)
from components.launch.kubernetes.pod import pod_template

RUNTIME = {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "batch-inference-torch"}
PATCH_MANAGER = "batch-inference.dev/launcher"


class TrainJobKind(JobSetPods):
    name = "trainjob"
    resource = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
    provider = "Kubeflow Trainer v2.3 and the runtime of cluster/overlays/trainjob"
    kueue_framework = "trainer.kubeflow.org/trainjob"

    def build(self, cfg: JobConfig) -> dict[str, Any]:
        """The TrainJob manifest: the worker pod split into ``trainer`` and ``runtimePatches``."""
        cfg.validate()
        if cfg.image_pull_policy:
            raise ValueError("image_pull_policy cannot be set on a TrainJob: the TrainingRuntime sets it")
        pod = pod_template(cfg, self.container)
        container = pod["spec"]["containers"][0]
        patched_spec = {k: v for k, v in pod["spec"].items() if k != "containers"}
        patched_spec["containers"] = [{"name": self.container, "volumeMounts": container["volumeMounts"]}]
        patched_pod: dict[str, Any] = {"metadata": pod["metadata"]} if pod["metadata"] else {}
        patched_pod["spec"] = patched_spec
        spec: dict[str, Any] = {
            "runtimeRef": dict(RUNTIME),
            "trainer": {
                "image": container["image"],
                "command": container["command"],
                "env": container["env"],
                "numNodes": cfg.nodes,
                "numProcPerNode": cfg.gpus_per_node,
                "resourcesPerNode": container["resources"],
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": REPLICATED_JOB, "template": {"spec": {"template": patched_pod}}}
                                ]
                            }
                        }
                    },
                }
            ],
        }
        if cfg.queue:
            spec["suspend"] = True  # Kueue admits it; until then no pod exists
        if cfg.active_deadline_seconds is not None:
            spec["activeDeadlineSeconds"] = cfg.active_deadline_seconds
        return job_object(self.resource, cfg, spec)

    def state(self, job: dict[str, Any]) -> JobState:
        conditions = true_conditions(job)
        if "Complete" in conditions:
            return JobState.of(SUCCEEDED, conditions["Complete"])
        if FAILED in conditions:
            return JobState.of(FAILED, conditions[FAILED])
        status = job.get("status") or {}
        return jobset_state(job, conditions, status.get("jobsStatus") or [])

    def gang_restarts(self, job: dict[str, Any]) -> int | None:
        # Only its JobSet counts them, which the launcher's Role may not read: its pods' labels tell.
        return 0

    def max_restarts(self, job: dict[str, Any]) -> int | None:
        return None  # the TrainingRuntime's, which the launcher's Role may not read


KIND = TrainJobKind()
