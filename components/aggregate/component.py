"""The aggregate step's KFP component, a thin wrapper over :func:`components.aggregate.aggregate.aggregate`."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.images import TASK_IMAGE


@dsl.component(base_image=TASK_IMAGE, install_kfp_package=False)
def aggregate_results(
    results_uri: str,
    job: Input[Artifact],
    price_per_gpu_hour: float,
    results_csv: Output[Dataset],
    results_parquet: Output[Dataset],
    errors_csv: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Merges a run's result parts, checks them against its plan and reports on them.

    Fails when an image of the plan has no row or more than one: the run is then incomplete.

    Args:
        results_uri: The run's results prefix (plan/, parts/, errors/, summary/).
        job: The launch step's job record (what ran, for how long).
        price_per_gpu_hour: Price of one GPU-hour, for the cost per million images; 0: no cost.
        results_csv: One CSV row per classified image, sorted by uri. An incremental run's
            table also holds its base run's rows for the images unchanged since.
        results_parquet: The same rows as Parquet.
        errors_csv: One row (uri, reason) per image that could not be classified.
        metrics: Counts, throughput, GPU-hours and cost.
        report: An HTML page: the run, counts, top classes, errors, throughput and cost.
    """
    from components.aggregate.aggregate import aggregate
    from components.launch.job_record import JobRecord

    outcome = aggregate(
        results_uri,
        job=JobRecord.read(job.path),
        price_per_gpu_hour=price_per_gpu_hour,
        csv_path=results_csv.path,
        parquet_path=results_parquet.path,
        errors_path=errors_csv.path,
        html_path=report.path,
    )
    for name, value in outcome.metrics.items():
        metrics.log_metric(name, value)
    results_csv.metadata["rows"] = results_parquet.metadata["rows"] = outcome.metrics["rows"]
    errors_csv.metadata["rows"] = outcome.metrics["errors"]
