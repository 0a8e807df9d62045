"""The pod every job kind runs: one node of the worker, under torchrun.

GPUs, the GKE node selector and the tolerations queued provisioning (DWS) needs, an in-memory
``/dev/shm``, the A3 Ultra RDMA NICs with the gIB NCCL plugin's volumes and environment, a GCS
FUSE volume when asked, and the torchrun command of the worker. The job kinds
(:mod:`components.launch.kubernetes.kinds`) wrap this pod template in their resource; none of
them builds a pod of its own. Also here: reading a pod's status (its main container's state).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from components.launch.kubernetes.kinds import JobConfig

ACCELERATOR_NODE_LABEL = "cloud.google.com/gke-accelerator"
GPU_RESOURCE = "nvidia.com/gpu"
QUEUED_PROVISIONING_TAINT = "cloud.google.com/gke-queued"

DEFAULT_INTERFACE_ANNOTATION = "networking.gke.io/default-interface"
INTERFACES_ANNOTATION = "networking.gke.io/interfaces"
GCSFUSE_ANNOTATION = "gke-gcsfuse/volumes"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"

GIB_HOST_PATH = "/home/kubernetes/bin/gib"
GIB_MOUNT_PATH = "/usr/local/gib"
NVIDIA_HOST_PATH = "/home/kubernetes/bin/nvidia"
NVIDIA_MOUNT_PATH = "/usr/local/nvidia"
NCCL_ENV_SCRIPT = f"{GIB_MOUNT_PATH}/scripts/set_nccl_env.sh"
RDMA_LD_LIBRARY_PATH = f"{NVIDIA_MOUNT_PATH}/lib64:{GIB_MOUNT_PATH}/lib64"


def torchrun_command(cfg: JobConfig) -> list[str]:
    """The container command: optional gIB NCCL setup, then torchrun running the worker.

    Node rank and the rendezvous address reach torchrun as ``PET_*`` variables (injected by
    the Training Operator or Trainer, or set by the JobSet kind from the downward API), which
    torchrun reads itself; only the shape is passed explicitly.

    Args:
        cfg: The job config.

    Returns:
        ``["bash", "-c", script]``.
    """
    # --tee prefixes every line with its process ("[default<local rank>]:"), which is how the
    # launcher tells the rank that failed first from the peers that echoed its death.
    torchrun = shlex.join(
        [
            "torchrun",
            f"--nnodes={cfg.nodes}",
            f"--nproc_per_node={cfg.gpus_per_node}",
            "--tee=3",
            "-m",
            "worker",
            *cfg.worker_args,
        ]
    )
    script = f"exec {torchrun}"
    if cfg.rdma:
        # set_nccl_env.sh exports the gIB tuning (NCCL_NET=gIB, ...) into this shell, so it must be
        # sourced, not run. exec replaces bash with torchrun, which then gets SIGTERM directly when
        # the pod is deleted and can stop its ranks cleanly.
        script = f"source {NCCL_ENV_SCRIPT} && {script}"
    return ["bash", "-c", script]


def _volumes_and_mounts(cfg: JobConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}}
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if cfg.rdma:
        volumes += [
            {"name": "gib", "hostPath": {"path": GIB_HOST_PATH}},
            {"name": "nvidia", "hostPath": {"path": NVIDIA_HOST_PATH}},
        ]
        mounts += [
            {"name": "gib", "mountPath": GIB_MOUNT_PATH},
            {"name": "nvidia", "mountPath": NVIDIA_MOUNT_PATH},
        ]
    if cfg.gcsfuse_bucket:
        volumes.append(
            {
                "name": "gcsfuse",
                "csi": {
                    "driver": GCSFUSE_DRIVER,
                    "readOnly": cfg.gcsfuse_read_only,
                    "volumeAttributes": {
                        "bucketName": cfg.gcsfuse_bucket,
                        "mountOptions": cfg.gcsfuse_mount_options,
                    },
                },
            }
        )
        mounts.append(
            {"name": "gcsfuse", "mountPath": cfg.gcsfuse_mount_path, "readOnly": cfg.gcsfuse_read_only}
        )
    return volumes, mounts


def _annotations(cfg: JobConfig) -> dict[str, str]:
    annotations: dict[str, str] = {}
    if cfg.rdma:
        annotations[DEFAULT_INTERFACE_ANNOTATION] = "eth0"
        annotations[INTERFACES_ANNOTATION] = json.dumps(
            [{"interfaceName": iface, "network": network} for iface, network in cfg.network_interfaces]
        )
    if cfg.gcsfuse_bucket:
        annotations[GCSFUSE_ANNOTATION] = "true"
    return annotations


def worker_env(cfg: JobConfig) -> list[dict[str, Any]]:
    """The worker container's environment (never a ``PET_*`` variable: the kinds own those)."""
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # so the launcher streams lines as they happen
    if cfg.rdma:
        env.append({"name": "LD_LIBRARY_PATH", "value": RDMA_LD_LIBRARY_PATH})
    return env + [{"name": k, "value": v} for k, v in sorted(cfg.env.items())]


def pod_template(cfg: JobConfig, container_name: str, extra_env: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The pod template (``metadata`` and ``spec``) of one node of the job.

    Args:
        cfg: The job config (validated by the caller).
        container_name: Name of the worker container: the job kind's controller finds its main
            container by name.
        extra_env: Variables the job kind adds after the worker's own (the JobSet rendezvous).

    Returns:
        A ``PodTemplateSpec`` as a plain dict, new on every call.
    """
    volumes, mounts = _volumes_and_mounts(cfg)
    requests: dict[str, str] = {GPU_RESOURCE: str(cfg.gpus_per_node)}
    if cfg.cpu_request:
        requests["cpu"] = cfg.cpu_request
    if cfg.memory_request:
        requests["memory"] = cfg.memory_request
    container: dict[str, Any] = {
        "name": container_name,
        "image": cfg.image,
        "command": torchrun_command(cfg),
        "env": worker_env(cfg) + list(extra_env),
        "resources": {"requests": requests, "limits": {GPU_RESOURCE: str(cfg.gpus_per_node)}},
        "volumeMounts": mounts,
    }
    if cfg.image_pull_policy:
        container["imagePullPolicy"] = cfg.image_pull_policy
    spec: dict[str, Any] = {
        "nodeSelector": {ACCELERATOR_NODE_LABEL: cfg.accelerator},
        "tolerations": [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
            # Nodes created by queued provisioning carry this taint so that only admitted pods land.
            {"key": QUEUED_PROVISIONING_TAINT, "operator": "Equal", "value": "true", "effect": "NoSchedule"},
        ],
        "containers": [container],
        "volumes": volumes,
    }
    if cfg.service_account:
        spec["serviceAccountName"] = cfg.service_account
    metadata: dict[str, Any] = {}
    if cfg.labels:
        metadata["labels"] = dict(cfg.labels)
    annotations = _annotations(cfg)
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


# -- reading a pod's status -------------------------------------------------------------------------


def container_state(pod: dict[str, Any], container: str) -> tuple[str, dict[str, Any]]:
    """``("running" | "terminated" | "waiting", details)`` of the named container."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            state = status.get("state") or {}
            for key in ("running", "terminated", "waiting"):
                if key in state:
                    return key, state[key]
    return "waiting", {}


def failed_termination(pod: dict[str, Any], container: str) -> dict[str, Any] | None:
    """The named container's ``terminated`` state that failed, now or before a restart; None if none did."""
    failed_pod = (pod.get("status") or {}).get("phase") == "Failed"
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        for state in (status.get("state") or {}, status.get("lastState") or {}):
            terminated = state.get("terminated")
            if terminated and (terminated.get("exitCode", 0) != 0 or failed_pod):
                return terminated
    return None


def failure_time(pod: dict[str, Any], container: str) -> str | None:
    """When the container failed (now or before a restart); None when it has not."""
    terminated = failed_termination(pod, container)
    if terminated is not None:
        return terminated.get("finishedAt") or ""
    return "" if (pod.get("status") or {}).get("phase") == "Failed" else None


def failure_status(pod: dict[str, Any], container: str) -> str:
    """What the pod's own status says of its failure, whether or not its log can be read.

    The container's exit code and reason (``exit code 137 (OOMKilled)``; the uninformative
    ``Error`` left out) with the last line of its termination message, then the pod's own reason
    and message (``Evicted: The node was low on resource: memory.``, ``DeadlineExceeded``).

    Returns:
        The parts found, ``; ``-joined; empty when the status says nothing.
    """
    parts = []
    terminated = failed_termination(pod, container)
    if terminated is not None:
        code = terminated.get("exitCode")
        text = f"exit code {code}" if code is not None else "terminated"
        if terminated.get("reason") and terminated["reason"] != "Error":
            text += f" ({terminated['reason']})"
        message = [line.strip() for line in (terminated.get("message") or "").splitlines() if line.strip()]
        if message:
            text += f": {message[-1][:200]}"
        parts.append(text)
    status = pod.get("status") or {}
    own = ": ".join(p for p in (status.get("reason"), (status.get("message") or "").strip()) if p)
    if own:
        parts.append(own)
    return "; ".join(parts)


def pod_place(pod: dict[str, Any]) -> str:
    """``pod <name> on <node>``: the pod and the Kubernetes node it was scheduled to, if it was."""
    host = (pod.get("spec") or {}).get("nodeName")
    return f"pod {pod['metadata']['name']}" + (f" on {host}" if host else "")


def is_terminating(obj: dict[str, Any]) -> bool:
    """Whether the object (a pod or a job) is being deleted."""
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))
