"""The launch step's KFP component, a thin wrapper over :func:`components.launch.launch.launch`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import TASK_IMAGE


@dsl.component(base_image=TASK_IMAGE, install_kfp_package=False)
def classify_images(
    images_uri: str,
    run_id: str,
    results_root: str,
    results_prefix: str,
    incremental: bool,
    overwrite: bool,
    model: str,
    backend: str,
    job_kind: str,
    batch_size: int,
    shard_size: int,
    device: str,
    extra_worker_args: str,
    local_nproc: int,
    nodes: int,
    gpus_per_node: int,
    namespace: str,
    queue: str,
    priority_class: str,
    accelerator: str,
    max_run_duration_seconds: int,
    timeout_seconds: int,
    rdma: bool,
    rdma_networks: str,
    image: str,
    service_account: str,
    gke_project: str,
    gke_location: str,
    gke_cluster: str,
    task: str,
    top_k: int,
    labels: list,
    labels_file: str,
    prompt: str,
    normalize: bool,
    embedding_dtype: str,
    job: Output[Artifact],
) -> NamedTuple("Outputs", results_uri=str):
    """Classifies every image under a prefix, locally under torchrun or as a job on GKE.

    The batch_inference pipeline's description says more about each parameter.

    Args:
        images_uri: The images' prefix (from the upload step).
        run_id: The pipeline run's id; a new results prefix is <results_root>/<run_id>.
        results_root: Where each run writes its results, under its own folder.
        results_prefix: The run's exact results prefix instead; one holding a plan is resumed.
        incremental: Classify only what changed since the latest complete run.
        overwrite: Replace another run's results at the results prefix instead of failing.
        model: The model: a hub id, or a gs:// or local model directory.
        backend: kubernetes (a job on GKE) or local (torchrun in this container).
        job_kind: pytorchjob, trainjob or jobset: the Kubernetes resource of the job.
        batch_size: Images per forward pass.
        shard_size: Images per shard.
        device: auto, cpu or cuda.
        extra_worker_args: More worker flags, which override the above.
        local_nproc: Worker processes of the local backend.
        nodes: Nodes of the job.
        gpus_per_node: GPUs per node.
        namespace: Namespace of the job.
        queue: Kueue LocalQueue, or empty.
        priority_class: Kueue WorkloadPriorityClass, or empty.
        accelerator: GPU type (node label cloud.google.com/gke-accelerator).
        max_run_duration_seconds: DWS maxRunDurationSeconds, or 0.
        timeout_seconds: How long to wait for the job, or 0 for ever.
        rdma: Use the RDMA NICs.
        rdma_networks: GKE networks of the NICs, or empty for the default.
        image: Container image of the job's pods.
        service_account: Kubernetes service account of the job's pods.
        gke_project: GCP project of the GKE cluster (a launcher outside it).
        gke_location: Region or zone of the GKE cluster.
        gke_cluster: Name of the GKE cluster.
        task: classification, embedding, zero-shot, or package.module:ClassName.
        top_k: Labels per image of the label tasks.
        labels: Zero-shot candidate labels.
        labels_file: Zero-shot labels file (one per line), instead of labels.
        prompt: Zero-shot text template, {} standing for the label.
        normalize: Unit-norm embeddings.
        embedding_dtype: float32 or float16 embeddings.
        job: A JSON record of the job: backend, name, nodes, world size, start, end and wall time.

    Returns:
        results_uri: The run's results prefix, for the aggregate step.
    """
    from components.launch.job_record import record_job, utc_now
    from components.launch.launch import LaunchRequest, launch

    request = LaunchRequest(
        images_uri=images_uri,
        run_id=run_id,
        results_root=results_root,
        results_prefix=results_prefix,
        incremental=incremental,
        overwrite=overwrite,
        model=model,
        backend=backend,
        job_kind=job_kind,
        batch_size=batch_size,
        shard_size=shard_size,
        device=device,
        extra_worker_args=extra_worker_args,
        local_nproc=local_nproc,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        namespace=namespace,
        queue=queue,
        priority_class=priority_class,
        accelerator=accelerator,
        max_run_duration_seconds=max_run_duration_seconds,
        timeout_seconds=timeout_seconds,
        rdma=rdma,
        rdma_networks=rdma_networks,
        image=image,
        service_account=service_account,
        gke_project=gke_project,
        gke_location=gke_location,
        gke_cluster=gke_cluster,
        task=task,
        top_k=top_k,
        labels=labels,
        labels_file=labels_file,
        prompt=prompt,
        normalize=normalize,
        embedding_dtype=embedding_dtype,
    )
    started = utc_now()
    outcome = launch(request)
    record_job(request, outcome, started, utc_now()).write(job.path)
    return NamedTuple("Outputs", results_uri=str)(outcome.results_uri)
