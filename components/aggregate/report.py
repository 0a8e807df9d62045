"""render_report: the aggregate's self-contained HTML page.

The KFP and Vertex UIs show HTML artifacts in a sandboxed iframe with no network, so
the page carries its own CSS, uses no scripts, fonts or images, and draws its charts as
inline SVG (``components.aggregate.charts``). Every value that came from the data is escaped.

Its size does not grow with the run: the charts resample every rank's timeline onto a fixed
grid, more than ``charts.LINES_PER_RANK_MAX`` ranks are drawn as their slowest, median and
fastest, and the tables show bounded samples.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from components.aggregate import charts
from components.aggregate.summary import AggregateReport

# Beyond this many ranks the per-rank table starts folded (a <details> element: no script).
RANK_ROWS_OPEN = 16

_CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff;
        --accent:#2f6fde; --ok:#1f8a4c; --warn:#b7791f; --bad:#c53030; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width:1040px; margin:0 auto; padding:24px; }
header { display:flex; align-items:center; justify-content:space-between; gap:16px; flex-wrap:wrap; }
h1 { font-size:22px; margin:0; }
h2 { font-size:16px; margin:0 0 12px; }
h3 { font-size:14px; margin:12px 0 6px; }
.sub { color:var(--muted); margin:4px 0 0; word-break:break-all; }
.badge { padding:4px 12px; border-radius:999px; font-weight:600; color:#fff; white-space:nowrap; }
.badge.ok { background:var(--ok); } .badge.bad { background:var(--bad); }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:16px 20px;
          margin-top:16px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(140px, 1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:6px; padding:10px 12px; }
.card .v { font-size:22px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card.warn .v { color:var(--warn); } .card.bad .v { color:var(--bad); }
table { width:100%; border-collapse:collapse; margin-top:12px; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.uri { word-break:break-all; font-family:ui-monospace, Menlo, Consolas, monospace; font-size:12px; }
.bars { display:grid; grid-template-columns:minmax(120px, 28%) 1fr auto; gap:6px 12px; align-items:center; }
.bars .label { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.bars .track { background:var(--bg); border-radius:3px; height:16px; }
.bars .fill { background:var(--accent); border-radius:3px; height:16px; }
.bars .n { text-align:right; font-variant-numeric:tabular-nums; color:var(--muted); }
.problems li { word-break:break-all; font-family:ui-monospace, Menlo, Consolas, monospace; font-size:12px; }
.muted { color:var(--muted); }
footer { color:var(--muted); font-size:12px; margin-top:16px; text-align:right; }
svg.chart { width:100%; height:auto; display:block; margin-top:8px; }
svg.chart text { font-size:11px; fill:var(--muted); }
svg.chart .axis { stroke:var(--line); stroke-width:1; }
svg.chart polyline { fill:none; stroke-width:1.8; }
.legend { display:flex; flex-wrap:wrap; gap:4px 14px; color:var(--muted); font-size:12px; margin-top:4px; }
.legend i { display:inline-block; width:12px; height:12px; border-radius:2px; margin-right:5px;
            vertical-align:-2px; }
details summary { cursor:pointer; color:var(--accent); margin-top:12px; }
.hint { background:var(--bg); border-left:3px solid var(--accent); padding:8px 12px; margin-top:12px; }
"""


def render_report(report: AggregateReport) -> str:
    """Render an aggregate report as one self-contained HTML page.

    Args:
        report: The output of ``aggregate`` (complete or not).

    Returns:
        The HTML document.
    """
    m = report.metrics
    task = report.run.get("task")
    status = ("ok", "Complete: every image exactly once") if report.complete else ("bad", "Incomplete")
    body = [
        "<header><div>",
        f"<h1>Batch inference: {_e(str(task))}</h1>" if task else "<h1>Batch inference</h1>",
        f'<p class="sub">{_e(report.results_uri)}</p>',
        "</div>",
        f'<span class="badge {status[0]}">{_e(status[1])}</span>',
        "</header>",
    ]
    if not report.complete:
        body.append(_problems(report))
    body += [
        "<section><h2>Results</h2>",
        _cards(
            [
                ("Images planned", _int(m["images"]), ""),
                ("With a result", _int(m["classified"]), ""),
                ("Errors", _int(m["errors"]), "warn" if m["errors"] else ""),
                ("Missing", _int(m["missing"]), "bad" if m["missing"] else ""),
                ("Duplicated", _int(m["duplicated"]), "bad" if m["duplicated"] else ""),
            ]
            # Only a task with a summary column (a label) has classes to count.
            + ([("Distinct classes", _int(m["distinct_classes"]), "")] if report.summary_column else [])
        ),
        "</section>",
        _time_and_cost(report),
        _throughput(report),
        _startup(report),
        _incremental(report),
        _scores(report),
        _top_classes(report.top_classes) if report.summary_column else "",
        _errors(report),
        _what_ran(report),
        f"<footer>Generated {_e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Batch inference report: {_e(task)}</title>"
        f"<style>{_CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _int(value: float) -> str:
    return f"{int(value):,}"


def _num(value: float, digits: int = 1) -> str:
    return f"{float(value):,.{digits}f}"


def _duration(seconds: float) -> str:
    """Seconds as a person reads them: 42.0 s, 12 min 5 s, 3 h 20 min."""
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 3600:
        minutes, rest = int(seconds // 60), int(seconds % 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _cls(name: str) -> str:
    return f' class="{name}"' if name else ""


def _cards(items: Iterable[tuple[str, str, str]]) -> str:
    """Headline numbers; each item is (caption, value, "" | "warn" | "bad")."""
    cards = "".join(
        f'<div{_cls(f"card {tone}".strip())}><div class="v">{_e(value)}</div><div class="k">{_e(caption)}</div></div>'
        for caption, value, tone in items
    )
    return f'<div class="cards">{cards}</div>'


def _table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]]) -> str:
    """A table; each header is (title, css class) and the class applies to its column."""
    head = "".join(f"<th{_cls(cls)}>{_e(title)}</th>" for title, cls in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td{_cls(cls)}>{_e(cell)}</td>" for (_, cls), cell in zip(headers, row, strict=False))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(title: str, *parts: str, anchor: str = "") -> str:
    ident = f' id="{anchor}"' if anchor else ""
    return f"<section{ident}><h2>{_e(title)}</h2>{''.join(parts)}</section>"


def _note(text: str) -> str:
    return f'<p class="muted">{_e(text)}</p>'


def _problems(report: AggregateReport) -> str:
    m = report.metrics
    parts = ["<section><h2>Why the results are incomplete</h2>"]
    for title, count, sample in (
        ("Missing (planned, found in neither parts nor errors)", m["missing"], report.missing_sample),
        ("Duplicated (found more than once)", m["duplicated"], report.duplicated_sample),
        ("Unexpected (in the results but not in the plan)", m["unexpected"], report.unexpected_sample),
    ):
        if not count:
            continue
        items = "".join(f"<li>{_e(uri)}</li>" for uri in sample)
        more = f'<p class="muted">First {len(sample):,} shown.</p>' if len(sample) < count else ""
        parts.append(f'<h3>{_e(title)}: {_int(count)}</h3><ul class="problems">{items}</ul>{more}')
    parts.append("</section>")
    return "".join(parts)


def _incremental(report: AggregateReport) -> str:
    """What an incremental run reused from its base run; nothing for a full run."""
    if not report.base_uri:
        return ""
    m = report.metrics
    cards = _cards(
        [
            ("Rows in results", _int(m["rows"]), ""),
            ("Reused from base", _int(m["reused"]), ""),
            ("Changed since base", _int(m["changed"]), ""),
            ("Deleted since base", _int(m["deleted"]), ""),
        ]
    )
    note = (
        f'<p class="muted">Only new and changed images were processed; the other rows come from '
        f"the base run {_e(report.base_uri)}, and rows of deleted images were dropped.</p>"
    )
    return f"<section><h2>Incremental run</h2>{note}{cards}</section>"


def _on_gpu(report: AggregateReport) -> bool:
    return bool(report.metrics.get("gpus"))


def _time_and_cost(report: AggregateReport) -> str:
    """The job's time: the wait for capacity apart from the time it held its machines, and what that cost."""
    m, job = report.metrics, report.job
    gpu = _on_gpu(report)
    cards = [("Job wall time", _duration(m.get("job_seconds", m["wall_seconds"])), "")]
    if m.get("queue_seconds") is not None:
        cards.append(("Queued for capacity", _duration(m["queue_seconds"]), ""))
    cards.append(
        ("Held its GPUs" if gpu else "Ran (start to end)", _duration(m.get("held_seconds", 0.0)), "")
    )
    cards += _cost_cards(report)
    rows: list[tuple[str, str]] = []
    if job is not None:
        rows += [("Job started", job.started_at), ("Job finished", job.finished_at)]
        rows += [("Job wall time (start-up included)", f"{_num(job.job_seconds)} s")]
        if job.queue_seconds is not None:
            caption = "Waited for capacity (queued, no GPUs held)" if gpu else "Waited for capacity (queued)"
            rows.append((caption, f"{_num(job.queue_seconds)} s"))
        if job.held_seconds is not None:
            caption = "Held its GPUs (admission to end)" if gpu else "Ran (admission to end)"
            rows.append((caption, f"{_num(job.held_seconds)} s"))
    if gpu and report.price_per_gpu_hour > 0:
        rows.append(("Price per GPU-hour", _num(report.price_per_gpu_hour, 2)))
    table = _table([("Time", ""), ("Value", "uri")], rows) if rows else ""
    hint = ""
    if gpu and report.price_per_gpu_hour <= 0:
        hint = (
            '<p class="hint">No cost shown: pass the price of one GPU-hour (your on-demand or DWS '
            "flex-start price for the accelerator) as the pipeline parameter <code>price_per_gpu_hour</code> "
            "(<code>--price-per-gpu-hour</code> on the command line) and the report shows the cost and the "
            "cost per million images.</p>"
        )
    elif not gpu:
        hint = _note("This run had no accelerators, so it has no accelerator-hours or cost.")
    return _section("Time and cost", _cards(cards), hint, table, anchor="time")


def _cost_cards(report: AggregateReport) -> list[tuple[str, str, str]]:
    """GPUs, GPU-hours and cost, on runs that had GPUs; a CPU run gets none of these cards."""
    m = report.metrics
    if not m.get("gpus"):
        return []
    cards = [("GPUs", _int(m["gpus"]), ""), ("GPU-hours", _num(m["gpu_hours"], 3), "")]
    if "cost" in m:
        cards.append(("Cost", _num(m["cost"], 2), ""))
    if "cost_per_million_images" in m:
        cards.append(("Cost / million images", _num(m["cost_per_million_images"], 2), ""))
    return cards


def _throughput(report: AggregateReport) -> str:
    m = report.metrics
    gpu = _on_gpu(report)
    cards = _cards(
        [
            ("Images / second", _num(m["images_per_second"]), ""),
            ("Processing time (slowest rank)", _duration(m["wall_seconds"]), ""),
            ("Ranks", _int(m["ranks"]), ""),
        ]
    )
    if not report.ranks:
        return _section("Throughput", cards, _note("No rank summaries found."), anchor="throughput")
    timelines = charts.rank_timelines(report.ranks)
    parts = [cards]
    if timelines:
        parts += [
            "<h3>Images per second over time</h3>",
            charts.rate_chart(timelines, "images", unit="img/s"),
        ]
        if gpu:
            parts += [
                "<h3>GPU busy with the model (share of time)</h3>",
                charts.rate_chart(timelines, "gpu_busy_seconds", unit="%", share=True),
            ]
        parts += [
            "<h3>Waiting for input (share of time)</h3>",
            charts.rate_chart(timelines, "input_wait_seconds", unit="%", share=True),
            _note(
                "High input wait means reading or decoding could not keep up with the model."
                + (
                    " Low GPU busy with low input wait means the host could not queue work fast enough."
                    if gpu
                    else ""
                )
            ),
        ]
    else:
        parts.append(_note("These ranks recorded no timeline (a worker older than the report)."))
    headers = [
        ("Rank", "n"),
        ("Device", ""),
        ("Images", "n"),
        ("Errors", "n"),
        ("Shards", "n"),
        ("Seconds", "n"),
        ("Img/s", "n"),
    ]
    headers += [("GPU busy", "n")] if gpu else []
    headers += [("Input wait", "n")]
    rows = []
    for r in report.ranks:
        row = [
            r.get("rank", ""),
            r.get("device", ""),
            _int(r.get("images", 0)),
            _int(r.get("errors", 0)),
            _int(r.get("shards", 0)),
            _num(r.get("seconds", 0.0)),
            _num(r.get("images_per_second", 0.0)),
        ]
        if gpu:
            row.append(f"{100 * float(r.get('gpu_busy', 0.0)):.0f} %")
        row.append(f"{100 * float(r.get('input_wait', 0.0)):.0f} %")
        rows.append(row)
    table = _table(headers, rows)
    if len(rows) > RANK_ROWS_OPEN:
        table = f"<details><summary>Every rank ({len(rows):,})</summary>{table}</details>"
    parts.append(table)
    return _section("Throughput", *parts, anchor="throughput")


def _startup(report: AggregateReport) -> str:
    """Where each rank's start-up went, from its process start to its first batch of results."""
    steps = charts.startup_steps(report.ranks, gpu=_on_gpu(report))
    if not steps:
        return ""
    return _section(
        "Start-up",
        _note("Seconds from each worker process's start; planning overlaps the model load."),
        charts.startup_chart(steps),
        anchor="startup",
    )


def _scores(report: AggregateReport) -> str:
    if not report.score_histogram:
        return ""
    total = sum(n for *_, n in report.score_histogram)
    return _section(
        f"Distribution of {report.score_column}",
        _note(f"{total:,} rows, {len(report.score_histogram)} bins."),
        charts.histogram(report.score_histogram),
        anchor="scores",
    )


def _what_ran(report: AggregateReport) -> str:
    """What the run was: model and revision, input, libraries, the job and its machines."""
    job, run = report.job, report.run
    rows: list[tuple[str, object]] = []
    rows.append(("Model", job.model if job else run.get("model")))
    rows.append(("Model revision", run.get("model_revision")))
    rows.append(("Images", job.images_uri if job else run.get("input")))
    rows.append(("Results", job.results_uri if job else report.results_uri))
    rows += [(caption, run.get(key)) for key, caption in (("task", "Task"), ("decode", "Decode"))]
    if job is not None:
        kind = job.parameters.get("job_kind")
        backend = f"{job.backend}, {kind}" if kind else job.backend
        rows.append(("Backend", f"{backend} ({job.job_name})" if job.job_name else backend))
        rows.append(("Nodes / processes", f"{job.nodes} / {job.world_size}"))
        rows += [(name, value) for name, value in sorted(job.parameters.items()) if name != "job_kind"]
    devices = sorted({str(r.get("device", "")) for r in report.ranks} - {""})
    if devices:
        rows.append(("Rank devices", ", ".join(devices)))
    versions = next((r["versions"] for r in report.ranks if isinstance(r.get("versions"), dict)), {})
    if versions:
        rows.append(("Libraries (rank 0)", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if report.base_uri:
        rows.append(("Base run", report.base_uri))
    rows = [(k, v) for k, v in rows if v not in ("", None)]
    return _section("What ran", _table([("Setting", ""), ("Value", "uri")], rows), anchor="what-ran")


def _top_classes(top: Sequence[tuple[str, int]]) -> str:
    if not top:
        return ""
    return _section(f"Top {len(top)} classes", charts.bars(top), anchor="classes")


def _errors(report: AggregateReport) -> str:
    total = report.metrics["errors"]
    if not total:
        return _section("Errors", _note("No errors."), anchor="errors")
    shown = len(report.errors_sample)
    note = f"Showing the first {shown:,} of {total:,} (by uri)." if shown < total else f"All {total:,} shown."
    table = _table([("URI", "uri"), ("Reason", "")], report.errors_sample)
    by_reason = (
        ["<h3>By reason</h3>", charts.bars(report.errors_by_reason)] if report.errors_by_reason else []
    )
    return _section(
        f"Errors: {_int(total)}", *by_reason, "<h3>Error rows</h3>", _note(note), table, anchor="errors"
    )
