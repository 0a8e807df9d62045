"""AggregateReport: what the aggregate found, shared by the merge and the HTML report."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.launch.job_record import JobRecord


@dataclass
class AggregateReport:
    """Everything the HTML report and the KFP metrics show.

    Attributes:
        results_uri: The worker's output prefix that was aggregated.
        metrics: images, classified, errors, missing, duplicated, unexpected, rows, reused,
            changed, deleted, distinct_classes, images_per_second, wall_seconds, ranks, gpus,
            job_seconds, held_seconds (the GPUs' time: admission to end), queue_seconds (the wait
            for capacity, on Kubernetes), and on GPU runs gpu_hours (plus cost and cost_per_million_images
            when a price was given). ``images`` to ``unexpected`` concern the images this run
            planned; ``rows`` is the merged table's size, ``reused`` of its rows come from the
            base run of an incremental run, whose ``changed`` and ``deleted`` rows were dropped.
        top_classes: ``(class, count)`` for the most frequent classes of the merged table,
            most frequent first.
        errors_sample: ``(uri, reason)`` of the first error rows by uri.
        ranks: The per-rank summaries, by rank.
        missing_sample: Planned URIs found in neither parts nor errors (first few).
        duplicated_sample: URIs found more than once (first few).
        unexpected_sample: URIs in the results that the plan does not contain (first few).
        base_uri: The base run of an incremental run, else None.
        job: The launch step's record of the job, when the aggregate ran in a pipeline.
        price_per_gpu_hour: The price the cost figures use (0: none).
        run: The worker's run record (``OUTPUT/run.json``: model, its revision, settings).
        score_column: The numeric column whose distribution the report draws ("" when the task's
            rows have none).
        score_histogram: ``(low, high, count)`` bins of ``score_column`` over the merged table.
        errors_by_reason: ``(reason, count)``, the error rows grouped by the kind of their reason
            (the text before its first colon), most frequent first.
    """

    results_uri: str
    metrics: dict[str, int | float]
    # The column whose values top_classes counts (the task's summary column); None: the task has none.
    summary_column: str | None = "classification"
    top_classes: list[tuple[str, int]] = field(default_factory=list)
    errors_sample: list[tuple[str, str]] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)
    missing_sample: list[str] = field(default_factory=list)
    duplicated_sample: list[str] = field(default_factory=list)
    unexpected_sample: list[str] = field(default_factory=list)
    base_uri: str | None = None
    job: JobRecord | None = None
    price_per_gpu_hour: float = 0.0
    run: dict = field(default_factory=dict)
    score_column: str = ""
    score_histogram: list[tuple[float, float, int]] = field(default_factory=list)
    errors_by_reason: list[tuple[str, int]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every planned image appears exactly once and nothing else does."""
        m = self.metrics
        return m["missing"] == 0 and m["duplicated"] == 0 and m["unexpected"] == 0
