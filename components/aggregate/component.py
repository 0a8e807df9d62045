"""The aggregate step's KFP component, a thin wrapper over :func:`components.aggregate.aggregate.aggregate`."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components.images import IMAGE


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
    from components.aggregate.aggregate import aggregate

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
