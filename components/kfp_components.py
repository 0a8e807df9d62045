"""The pipeline's three KFP components: thin wrappers over the plain modules beside them.

Each body imports a plain module of this package from the project's image and calls it;
the logic lives (and is tested) there. The image already holds every dependency, so no
component installs anything at run time (``install_kfp_package=False``, no packages).
"""

import os

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

DEFAULT_IMAGE = "ghcr.io/example/kfp-batch-inference:0.1.0"
# Read once at import, so one compile uses one image throughout (and stays deterministic).
IMAGE = os.environ.get("BATCH_INFERENCE_IMAGE", DEFAULT_IMAGE)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def upload_dataset(source: str, destination: str, workers: int, dataset: Output[Dataset]):
    """Copies a dataset under a gs:// prefix, skipping objects already there unchanged.

    With an empty source nothing is copied: the images are already at the destination.

    Args:
        source: A local directory, an http(s) URL of a zip archive, a gs:// prefix, or empty.
        destination: The gs:// prefix to fill (or that already holds the images).
        workers: Parallel transfers.
        dataset: Points at the destination; metadata has the upload's object and byte counts.
    """
    dataset.uri = destination
    dataset.metadata["upload_skipped"] = not source
    if source:
        from components.upload import upload_dataset as upload

        report = upload(source, destination, workers=workers)
        dataset.uri = report.destination
        dataset.metadata.update(
            uploaded=report.uploaded,
            skipped=report.skipped,
            objects=report.total_objects,
            bytes=report.total_bytes,
        )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def launch_inference(
    images: Input[Dataset],
    results: Output[Dataset],
    run_id: str,
    results_root: str,
    results_prefix: str,
    incremental: bool,
    model: str,
    backend: str,
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
):
    """Classifies every image under a prefix, locally under torchrun or as a PyTorchJob on GKE.

    The parameters other than the two artifacts are those of the batch_inference pipeline
    (see its description), plus the run id that makes the results prefix unique.

    Args:
        images: The images' prefix (from the upload step).
        results: Points at the run's results prefix; metadata has backend, job, nodes and world size.
    """
    # The parameters are LaunchRequest's fields one for one (a test holds them in step).
    params = {k: v for k, v in locals().items() if k not in ("images", "results")}
    from components.launch.launch import LaunchRequest, launch

    outcome = launch(LaunchRequest(images_uri=images.uri, **params))
    results.uri = outcome.results_uri
    results.metadata.update(
        backend=outcome.backend, job_name=outcome.job_name, nodes=outcome.nodes, world_size=outcome.world_size
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def aggregate_results(
    results: Input[Dataset],
    results_csv: Output[Dataset],
    results_parquet: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Merges a run's result parts, checks them against its plan and reports on them.

    Fails when an image of the plan has no row or more than one: the run is then incomplete.

    Args:
        results: The run's results prefix (plan.jsonl, parts/, errors/, summary/).
        results_csv: One CSV row per classified image (images that failed to decode are
            counted as errors and listed in the report). An incremental run's table also
            holds its base run's rows for the images unchanged since.
        results_parquet: The same rows as Parquet.
        metrics: Images, errors, distinct classes, throughput and GPU-seconds.
        report: An HTML page: counts, top classes, errors and throughput.
    """
    from components.aggregate import aggregate_results as aggregate

    # Extensions make the files open in the right program once downloaded (the path follows the uri).
    results_csv.uri, results_parquet.uri, report.uri = (
        results_csv.uri + ".csv",
        results_parquet.uri + ".parquet",
        report.uri + ".html",
    )
    outcome = aggregate(
        results.uri, csv_path=results_csv.path, parquet_path=results_parquet.path, html_path=report.path
    )
    for name, value in outcome.metrics.items():
        metrics.log_metric(name, value)
    results_csv.metadata["rows"] = results_parquet.metadata["rows"] = outcome.metrics["rows"]
