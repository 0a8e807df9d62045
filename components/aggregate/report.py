"""render_report: the aggregate's self-contained HTML page.

The KFP and Vertex UIs show HTML artifacts in a sandboxed iframe with no network, so
the page carries its own CSS, uses no scripts, fonts or images, and draws its bar
chart with plain CSS. Every value that came from the data is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from components.aggregate.summary import AggregateReport

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
"""


def render_report(report: AggregateReport) -> str:
    """Render an aggregate report as one self-contained HTML page.

    Args:
        report: The output of ``aggregate`` (complete or not).

    Returns:
        The HTML document.
    """
    m = report.metrics
    status = ("ok", "Complete: every image exactly once") if report.complete else ("bad", "Incomplete")
    body = [
        "<header><div>",
        "<h1>Batch image classification</h1>",
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
                ("Classified", _int(m["classified"]), ""),
                ("Errors", _int(m["errors"]), "warn" if m["errors"] else ""),
                ("Missing", _int(m["missing"]), "bad" if m["missing"] else ""),
                ("Duplicated", _int(m["duplicated"]), "bad" if m["duplicated"] else ""),
            ]
            # Only a task with a summary column (a label) has classes to count.
            + ([("Distinct classes", _int(m["distinct_classes"]), "")] if report.summary_column else [])
        ),
        "</section>",
        _run(report),
        _incremental(report),
        _throughput(report),
        _top_classes(report.top_classes) if report.summary_column else "",
        _errors(report),
        f"<footer>Generated {_e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Batch classification report</title>"
        f"<style>{_CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _int(value: float) -> str:
    return f"{int(value):,}"


def _num(value: float, digits: int = 1) -> str:
    return f"{float(value):,.{digits}f}"


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
        f'<p class="muted">Only new and changed images were classified; the other rows come from '
        f"the base run {_e(report.base_uri)}, and rows of deleted images were dropped.</p>"
    )
    return f"<section><h2>Incremental run</h2>{note}{cards}</section>"


def _throughput(report: AggregateReport) -> str:
    m = report.metrics
    cards = _cards(
        [
            ("Images / second", _num(m["images_per_second"]), ""),
            ("Wall time (slowest rank)", f"{_num(m['wall_seconds'])} s", ""),
            ("Ranks", _int(m["ranks"]), ""),
            *_cost_cards(report),
        ]
    )
    if not report.ranks:
        return f'<section><h2>Throughput</h2>{cards}<p class="muted">No rank summaries found.</p></section>'
    rows = [
        (
            r.get("rank", ""),
            r.get("device", ""),
            _int(r.get("images", 0)),
            _int(r.get("errors", 0)),
            _int(r.get("shards", 0)),
            _num(r.get("seconds", 0.0)),
            _num(r.get("images_per_second", 0.0)),
        )
        for r in report.ranks
    ]
    table = _table(
        [
            ("Rank", "n"),
            ("Device", ""),
            ("Images", "n"),
            ("Errors", "n"),
            ("Shards", "n"),
            ("Seconds", "n"),
            ("Img/s", "n"),
        ],
        rows,
    )
    return f"<section><h2>Throughput</h2>{cards}{table}</section>"


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


def _run(report: AggregateReport) -> str:
    """What the run was: model, input, parameters, and when and how long its job ran."""
    job = report.job
    if job is None:
        return ""
    rows = [
        ("Model", job.model),
        ("Images", job.images_uri),
        ("Results", job.results_uri),
        ("Backend", f"{job.backend} ({job.job_name})" if job.job_name else job.backend),
        ("Nodes / processes", f"{job.nodes} / {job.world_size}"),
        ("Job started", job.started_at),
        ("Job finished", job.finished_at),
        ("Job wall time (start-up included)", f"{_num(job.job_seconds)} s"),
        *(
            (caption, f"{_num(seconds)} s")
            for caption, seconds in (
                ("Waited for capacity (queued, no GPUs held)", job.queue_seconds),
                ("Held its GPUs (admission to end)", job.held_seconds),
            )
            if seconds is not None
        ),
        *((name, value) for name, value in sorted(job.parameters.items())),
    ]
    if report.price_per_gpu_hour > 0 and report.metrics.get("gpus"):
        rows.append(("Price per GPU-hour", _num(report.price_per_gpu_hour, 2)))
    table = _table([("Setting", ""), ("Value", "uri")], rows)
    return f"<section><h2>Run</h2>{table}</section>"


def _top_classes(top: Sequence[tuple[str, int]]) -> str:
    if not top:
        return '<section><h2>Top classes</h2><p class="muted">No classified images.</p></section>'
    peak = max(count for _, count in top) or 1
    rows = "".join(
        f'<div class="label" title="{_e(name)}">{_e(name)}</div>'
        f'<div class="track"><div class="fill" style="width:{100.0 * count / peak:.1f}%"></div></div>'
        f'<div class="n">{_int(count)}</div>'
        for name, count in top
    )
    return f'<section><h2>Top {len(top)} classes</h2><div class="bars">{rows}</div></section>'


def _errors(report: AggregateReport) -> str:
    total = report.metrics["errors"]
    if not total:
        return '<section><h2>Errors</h2><p class="muted">No errors.</p></section>'
    shown = len(report.errors_sample)
    note = f"Showing the first {shown:,} of {total:,} (by uri)." if shown < total else f"All {total:,} shown."
    table = _table([("URI", "uri"), ("Reason", "")], report.errors_sample)
    return f'<section><h2>Errors: {_int(total)}</h2><p class="muted">{_e(note)}</p>{table}</section>'
