"""The batch_inference pipeline: check -> upload -> launch -> aggregate, in two flavours.

One factory builds both flavours so they cannot drift apart:

* **Kubeflow** (``batch_inference``): the launcher's pod gets kfp-kubernetes settings,
  which compile into a second YAML document (``platforms:``).
* **Vertex** (``batch_inference_vertex``): no kfp-kubernetes at all, because Vertex AI
  Pipelines loads templates with a single-document YAML loader. Its launcher runs
  outside the cluster and reaches GKE through ``gke_project/gke_location/gke_cluster``.

The launcher pod's Kubernetes service account cannot be set from the pipeline:
kfp-kubernetes 2.17 has no such setting. On Kubeflow a run's pods use the service
account the run was submitted with (``kfp.Client().create_run_from_pipeline_package(...,
service_account=...)``, by default the profile's ``default-editor``/``pipeline-runner``);
that account needs the RBAC in ``cluster/`` to create and watch PyTorchJobs.
"""

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Dataset, Metrics

from components.aggregate.component import aggregate_results
from components.check.checks import WORKER_DEFAULTS
from components.check.component import check_parameters
from components.images import Images
from components.launch.component import classify_images
from components.launch.kubernetes.kinds import DEFAULT_JOB_KIND
from components.upload.component import upload_images
from components.upload.packing import DEFAULT_SHARD_MB
from worker.config import DEFAULT_BATCH_SIZE, DEFAULT_MODEL

PIPELINE_NAME = "batch-inference"


# Python types of the pipeline's parameter types (kfp's InputSpec.type).
def list_parameter(text: str) -> list[str]:
    """A list parameter on a command line: a JSON array, or comma-separated values."""
    if text.lstrip().startswith("["):
        return [str(v) for v in json.loads(text)]
    return [v.strip() for v in text.split(",") if v.strip()]


PARAMETER_TYPES = {"String": str, "Integer": int, "Boolean": bool, "Float": float, "List": list_parameter}
KUBEFLOW = "kubeflow"
VERTEX = "vertex"
FLAVOURS = (KUBEFLOW, VERTEX)


@dataclass(frozen=True)
class StepSettings:
    """How one task runs: its name in the UI, its pod's resources, retries and caching.

    Attributes:
        display_name: The task's name in the KFP and Vertex UIs.
        cpu_request: CPU the task's pod asks for.
        cpu_limit: CPU it may use (on Vertex the limits also pick the machine type).
        memory_request: Memory its pod asks for.
        memory_limit: Memory it may use.
        retries: Retries after a failure (0: none).
        cache: Whether a run with the same inputs may reuse an earlier result.
    """

    display_name: str
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    retries: int
    cache: bool


# The parameters are checked in a task of their own, first, so that a bad run fails in seconds.
# Upload and aggregate talk to GCS for minutes and are idempotent, so a transient error is
# worth retrying. The launch step never is: its job's own restarts cover a lost pod, and a
# retry would start a second job. Upload may be cached (an unchanged source and destination
# need no second pass); launch and aggregate never, as they read GCS state their inputs do
# not capture (a rerun of one results prefix resumes the work and aggregates afresh).
# The aggregate streams in bounded memory (see benchmarks/NOTES.md for its peak).
STEPS = {
    # The checks fail the same way every time: retrying them would only delay the error.
    "check": StepSettings("Check parameters", "1", "2", "1Gi", "2Gi", retries=0, cache=False),
    "upload": StepSettings("Upload images", "2", "4", "4Gi", "8Gi", retries=3, cache=True),
    "launch": StepSettings("Classify images", "1", "4", "2Gi", "8Gi", retries=0, cache=False),
    "aggregate": StepSettings("Aggregate results", "2", "4", "4Gi", "8Gi", retries=3, cache=False),
}
# The components of the four tasks, in the order make_pipeline unpacks them.
TASK_COMPONENTS = (check_parameters, upload_images, classify_images, aggregate_results)
RETRY_BACKOFF = "30s"
RETRY_BACKOFF_FACTOR = 2.0
RETRY_BACKOFF_MAX = "600s"


class Outputs(NamedTuple):
    results_uri: str
    job: Artifact
    results_csv: Dataset
    results_parquet: Dataset
    errors_csv: Dataset
    metrics: Metrics
    report: HTML


def _apply_step_settings(task: dsl.PipelineTask, role: str, flavour: str) -> None:
    settings = STEPS[role]
    task.set_display_name(settings.display_name)
    task.set_cpu_request(settings.cpu_request).set_cpu_limit(settings.cpu_limit)
    task.set_memory_request(settings.memory_request).set_memory_limit(settings.memory_limit)
    task.set_caching_options(settings.cache)
    if settings.retries:
        task.set_retry(
            num_retries=settings.retries,
            backoff_duration=RETRY_BACKOFF,
            backoff_factor=RETRY_BACKOFF_FACTOR,
            backoff_max_duration=RETRY_BACKOFF_MAX,
        )
    if flavour == KUBEFLOW:
        _kubeflow_pod_settings(task, role)


def _kubeflow_pod_settings(task: dsl.PipelineTask, role: str) -> None:
    """kfp-kubernetes settings of each task's pod (Kubeflow flavour only)."""
    # Labels make the run's pods easy to find: kubectl logs -l app.kubernetes.io/component=launch
    kubernetes.add_pod_label(task, "app.kubernetes.io/name", PIPELINE_NAME)
    kubernetes.add_pod_label(task, "app.kubernetes.io/component", role)
    if role == "launch":
        # The launcher waits up to timeout_seconds for DWS capacity and the job; an autoscaler
        # compacting CPU nodes must not evict it mid-wait, which would fail the run.
        kubernetes.add_pod_annotation(task, "cluster-autoscaler.kubernetes.io/safe-to-evict", "false")


def _on_image(component: Callable, image: str) -> Callable:
    """A copy of a task's component that runs in ``image`` (its decorator fixed the default)."""
    copied = copy.deepcopy(component)
    copied.component_spec.implementation.container.image = image
    return copied


def make_pipeline(flavour: str, images: Images | None = None) -> Callable:
    """Build the batch_inference pipeline for one flavour (``kubeflow`` or ``vertex``).

    Args:
        flavour: ``kubeflow`` or ``vertex``.
        images: The image of its tasks, and the default of its ``image`` parameter; None: those
            of the template (``components.images``).
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    images = images or Images()
    check_parameters, upload_images, classify_images, aggregate_results = (
        _on_image(component, images.task) for component in TASK_COMPONENTS
    )

    @dsl.pipeline(name=PIPELINE_NAME)
    def batch_inference(
        source: str = "",
        images_uri: str = "",
        results_root: str = "",
        results_prefix: str = "",
        incremental: bool = False,
        overwrite: bool = False,
        upload_workers: int = 16,
        upload_layout: str = "loose",
        packed_shard_mb: int = DEFAULT_SHARD_MB,
        packed_shard_images: int = 0,
        model: str = DEFAULT_MODEL,
        task: str = WORKER_DEFAULTS["task"],
        top_k: int = WORKER_DEFAULTS["top_k"],
        labels: list = [],  # noqa: B006 - KFP takes a parameter's default from the signature
        labels_file: str = WORKER_DEFAULTS["labels_file"],
        prompt: str = WORKER_DEFAULTS["prompt"],
        normalize: bool = WORKER_DEFAULTS["normalize"],
        embedding_dtype: str = WORKER_DEFAULTS["embedding_dtype"],
        backend: str = "kubernetes",
        job_kind: str = DEFAULT_JOB_KIND,
        batch_size: int = DEFAULT_BATCH_SIZE["cuda"],
        shard_size: int = 1024,
        device: str = "auto",
        extra_worker_args: str = "",
        local_nproc: int = 1,
        nodes: int = 2,
        gpus_per_node: int = 8,
        namespace: str = "batch-inference",
        queue: str = "dws-local-queue",
        priority_class: str = "",
        accelerator: str = "nvidia-h200-141gb",
        max_run_duration_seconds: int = 7200,
        timeout_seconds: int = 86400,
        rdma: bool = True,
        rdma_networks: str = "",
        image: str = images.worker,
        service_account: str = "batch-inference-worker",
        gke_project: str = "",
        gke_location: str = "",
        gke_cluster: str = "",
        price_per_gpu_hour: float = 0.0,
    ) -> Outputs:
        """Classify every image under a GCS prefix with a Hugging Face model, exactly once.

        Args:
            source: Where the images come from, copied to images_uri first: a local directory,
                an http(s) URL of a zip (e.g. http://images.cocodataset.org/zips/val2017.zip) or a
                gs:// prefix. Empty: the images are already at images_uri and the upload is skipped.
            images_uri: The gs:// prefix that holds the images (the upload's destination). Required.
            results_root: gs:// prefix under which each run writes its results to <results_root>/<run id>/.
                Required unless results_prefix is set.
            results_prefix: Exact results prefix for this run, instead of <results_root>/<run id>.
                A prefix that already holds a run's plan resumes that run; one that holds another run's
                results (other images, model or model files, plan or settings) is refused unless
                overwrite is set. Empty: a new prefix per run.
            incremental: Classify only the images that are new or changed (by GCS generation) since the
                latest complete run with the same images_uri and model (the same model files too, and
                task, device type and decode) among the sibling folders of this run's results prefix
                (the runs under results_root). The results still cover every image:
                that run's rows are carried over for unchanged images, and deleted images are dropped.
                Needs a gs:// images_uri. False: classify everything.
            overwrite: If the results prefix holds results of another run, delete them and start over
                instead of failing. Results of this same run are resumed either way, so a retried
                run keeps its committed shards.
            upload_workers: Parallel transfers of the upload.
            upload_layout: How the upload stores the images under images_uri: loose (one object per
                file) or packed (WebDataset tar shards with an index each and a manifest, under
                images_uri/packed/; a run then reads a batch of images with one ranged request
                instead of one request per image, and a rerun packs only new or changed files).
                The worker finds packed shards by itself, also when source is empty.
            packed_shard_mb: With upload_layout packed: the most MB per shard.
            packed_shard_images: With upload_layout packed: the most images per shard. 0: no limit.
            model: Hugging Face hub id, or a gs:// or local directory holding a save_pretrained()
                model for the task and its image processor config; or a torch.export (.pt2) or
                TorchScript (.pt, .ts) file, gs:// or local, with preprocess.json (and, for labels,
                labels.txt) beside it (docs/tasks.md).
            task: What the model does with each image (docs/tasks.md): classification (an image
                classifier's labels), embedding (image feature vectors, as transformers'
                image-feature-extraction pipeline gives them: a fixed-size list column in the
                Parquet, left out of the CSV), zero-shot (CLIP/SigLIP-style labels chosen at run
                time from labels or labels_file), or package.module:ClassName, a task class of
                your own importable in the worker's image.
            top_k: classification and zero-shot: the k best labels per image; above 1 the
                results also hold top_labels, top_label_indices and top_scores list columns.
            labels: zero-shot: the candidate labels, e.g. ["cat", "dog", "a red car"].
            labels_file: zero-shot: instead of labels, a text file of labels, one per line
                (gs:// for the kubernetes backend).
            prompt: zero-shot: the text each label is put in, {} standing for the label (the
                default is transformers' pipeline's).
            normalize: embedding: scale each vector to unit L2 norm.
            embedding_dtype: embedding: float32 or float16 vectors.
            backend: Where the worker runs: kubernetes (a PyTorchJob on GKE) or local (torchrun
                inside the launcher's own container).
            job_kind: The Kubernetes resource that runs the worker on the kubernetes backend:
                pytorchjob (Kubeflow Training Operator v1), trainjob (Kubeflow Trainer v2) or
                jobset (JobSet), each queued through Kueue.
            batch_size: Images per forward pass on each GPU.
            shard_size: Images per shard, the unit of work assignment, commit and resume.
            device: auto (cuda when a GPU is visible, else cpu), cpu or cuda.
            extra_worker_args: More `python -m worker` flags, space-separated, e.g.
                '--assignment dynamic --read-threads 16'. They override the parameters above.
            local_nproc: Worker processes for the local backend (torchrun --nproc_per_node).
            nodes: Nodes (pods) of the PyTorchJob: one Master plus nodes-1 Workers.
            gpus_per_node: GPUs per node; also torchrun's processes per node.
            namespace: Kubernetes namespace of the PyTorchJob and its Kueue LocalQueue.
            queue: Kueue LocalQueue of the job (DWS flex-start). Empty: submit without Kueue.
            priority_class: Kueue WorkloadPriorityClass of the job. Empty: none.
            accelerator: GPU type, the node label cloud.google.com/gke-accelerator.
            max_run_duration_seconds: DWS maxRunDurationSeconds: how long the provisioned nodes
                may run (at most 7 days). 0: not set.
            timeout_seconds: How long the launcher waits for the run, queueing for DWS capacity
                included, before it deletes the job and fails. 0: wait forever.
            rdma: Use the A3 Ultra RDMA NICs and the gIB NCCL plugin.
            rdma_networks: Comma-separated GKE network names for eth0, eth1, ... when rdma is on.
                Empty: default, gvnic-1, rdma-0 ... rdma-7.
            image: Container image of the job's pods (the project's CUDA worker image). Default: the
                one the pipeline was compiled with (compile --image; a placeholder in compiled/).
            service_account: Kubernetes service account of the PyTorchJob's pods (Workload Identity
                for GCS). Empty: the namespace's default.
            gke_project: GCP project of the GKE cluster, for a launcher outside the cluster (Vertex).
                Empty with gke_location and gke_cluster: in-cluster credentials.
            gke_location: Region or zone of the GKE cluster (with gke_project).
            gke_cluster: Name of the GKE cluster (with gke_project).
            price_per_gpu_hour: Price of one GPU-hour (e.g. your on-demand or DWS price), for
                the report's cost and cost per million images. 0: no cost shown.
        """
        check = check_parameters(
            source=source,
            images_uri=images_uri,
            results_root=results_root,
            results_prefix=results_prefix,
            model=model,
            backend=backend,
            image=image,
            batch_size=batch_size,
            shard_size=shard_size,
            incremental=incremental,
            upload_layout=upload_layout,
            packed_shard_mb=packed_shard_mb,
            packed_shard_images=packed_shard_images,
            task=task,
            top_k=top_k,
            labels=labels,
            labels_file=labels_file,
            prompt=prompt,
            normalize=normalize,
            embedding_dtype=embedding_dtype,
        )
        # Always one upload task, which copies nothing when source is empty. A dsl.If/Else would
        # skip the pod too, but the local run must execute this very graph.
        upload = upload_images(
            source=source,
            images_uri=images_uri,
            workers=upload_workers,
            layout=upload_layout,
            shard_mb=packed_shard_mb,
            shard_images=packed_shard_images,
        ).after(check)
        launch = classify_images(
            images_uri=upload.outputs["images_uri"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
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
        aggregate = aggregate_results(
            results_uri=launch.outputs["results_uri"],
            job=launch.outputs["job"],
            price_per_gpu_hour=price_per_gpu_hour,
        )
        for task, role in (
            (check, "check"),
            (upload, "upload"),
            (launch, "launch"),
            (aggregate, "aggregate"),
        ):
            _apply_step_settings(task, role, flavour)
        return Outputs(
            results_uri=launch.outputs["results_uri"],
            job=launch.outputs["job"],
            results_csv=aggregate.outputs["results_csv"],
            results_parquet=aggregate.outputs["results_parquet"],
            errors_csv=aggregate.outputs["errors_csv"],
            metrics=aggregate.outputs["metrics"],
            report=aggregate.outputs["report"],
        )

    return batch_inference


batch_inference = make_pipeline(KUBEFLOW)
batch_inference_vertex = make_pipeline(VERTEX)
PIPELINES = {KUBEFLOW: batch_inference, VERTEX: batch_inference_vertex}


def launch_inputs() -> dict:
    """The pipeline's parameters that the launch step takes, as kfp ``InputSpec``s.

    They are ``LaunchRequest``'s fields except ``run_id`` (KFP fills it in), with the
    pipeline's defaults and descriptions, so dry runs and tests need not repeat them.
    """
    from components.launch.launch import LaunchRequest

    names = {f.name for f in dataclasses.fields(LaunchRequest)}
    return {name: spec for name, spec in batch_inference.component_spec.inputs.items() if name in names}


def compiled_filename(flavour: str) -> str:
    return f"batch_inference_{flavour}.yaml"


def compile_pipeline(flavour: str, path: str | Path, images: Images | None = None) -> Path:
    """Compile one flavour (``kubeflow`` or ``vertex``) into the file ``path``.

    Args:
        flavour: ``kubeflow`` or ``vertex``.
        path: The YAML file to write.
        images: The images it names; None: those of the template (``components.images``).
    """
    from kfp import compiler

    pipeline = make_pipeline(flavour, images) if images else PIPELINES[flavour]
    compiler.Compiler().compile(pipeline, str(path))
    return Path(path)


def compile_pipelines(out_dir: str | Path, images: Images | None = None) -> list[Path]:
    """Compile both flavours into ``out_dir`` (``batch_inference_{kubeflow,vertex}.yaml``).

    Args:
        out_dir: The folder to write them into.
        images: The images they name; None: those of the template (``components.images``).

    Returns:
        The files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [compile_pipeline(flavour, out / compiled_filename(flavour), images) for flavour in PIPELINES]
