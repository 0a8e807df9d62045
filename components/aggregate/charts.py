"""The report's charts as inline SVG and plain HTML: no scripts, fonts or images to fetch.

Their size is bounded whatever the run: a rank's timeline (``worker.telemetry.Timeline``) is
resampled onto ``GRID_POINTS`` intervals, and beyond ``LINES_PER_RANK_MAX`` ranks a chart draws
the slowest, median and fastest rank at each moment instead of one line per rank.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence

GRID_POINTS = 60
LINES_PER_RANK_MAX = 12
STARTUP_RANKS_SHOWN = 16
PALETTE = (
    "#2f6fde", "#e8590c", "#2b8a3e", "#c2255c", "#6741d9", "#0b7285",
    "#e67700", "#5c940d", "#862e9c", "#1864ab", "#a61e4d", "#495057",
)  # fmt: skip
WIDTH, HEIGHT = 960, 220
LEFT, RIGHT, TOP, BOTTOM = 84, 14, 10, 30

# The worker's start-up marks (``setup_done_at``), in order, and what the time up to each was.
STARTUP_STEPS = (
    ("imports", "Python imports"),
    ("process_group", "Process group"),
    ("model_fetched", "Model fetch"),
    ("model_loaded", "Model load"),
    ("first_forward", "Warm-up (first forward)"),
    ("warmed_up", "Compile and CUDA graph"),
    ("plan_shared", "Waiting for the plan"),
    ("decoder_ready", "Decoder set-up"),
    ("first_batch", "First batch"),
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``value``, so the axis ticks are round."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    while scale > value:
        scale /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale


def rank_timelines(ranks: Sequence[dict]) -> list[tuple[str, dict[str, list[float]]]]:
    """Each rank's timeline as (label, column -> values); ranks without one are left out."""
    out = []
    for r in ranks:
        timeline = r.get("timeline")
        if not isinstance(timeline, dict) or len(timeline.get("samples", ())) < 2:
            continue
        columns = timeline["columns"]
        values = {name: [float(s[i]) for s in timeline["samples"]] for i, name in enumerate(columns)}
        if values["seconds"][-1] > 0:  # a rank that processed for no measurable time draws nothing
            out.append((f"rank {r.get('rank', len(out))}", values))
    return out


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """``ys`` at ``x``, linearly between the samples (``xs`` ascending, ``xs[0] <= x <= xs[-1]``)."""
    lo, hi = 0, len(xs) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if xs[mid] <= x:
            lo = mid
        else:
            hi = mid
    if xs[hi] == xs[lo]:
        return ys[hi]
    return ys[lo] + (ys[hi] - ys[lo]) * (x - xs[lo]) / (xs[hi] - xs[lo])


def _rates(timelines, column: str, scale: float) -> tuple[list[float], list[list[float | None]]]:
    """The grid's times, and each rank's rate of ``column`` per second at each (None: rank done)."""
    end = max(t["seconds"][-1] for _, t in timelines)
    grid = [end * i / GRID_POINTS for i in range(GRID_POINTS + 1)]
    series = []
    for _, t in timelines:
        xs, ys = t["seconds"], t[column]
        values: list[float | None] = [None]
        for a, b in zip(grid, grid[1:], strict=False):
            if b > xs[-1] + 1e-9:
                values.append(None)
                continue
            values.append(scale * (_interpolate(xs, ys, b) - _interpolate(xs, ys, a)) / (b - a))
        series.append(values)
    return grid, series


def rate_chart(timelines, column: str, *, unit: str, share: bool = False) -> str:
    """A line chart of ``column``'s rate over processing time: per rank, or slowest/median/fastest."""
    grid, series = _rates(timelines, column, 100.0 if share else 1.0)
    labels = [label for label, _ in timelines]
    if len(series) > LINES_PER_RANK_MAX:
        spread: dict[str, list[float | None]] = {"slowest rank": [], "median rank": [], "fastest rank": []}
        for i in range(len(grid)):
            present = sorted(v[i] for v in series if v[i] is not None)
            for name, pick in zip(spread, (min, statistics.median, max), strict=True):
                spread[name].append(pick(present) if present else None)
        labels, series = list(spread), list(spread.values())
    peak = max((v for s in series for v in s if v is not None), default=0.0)
    top = 100.0 if share else _nice_ceiling(peak * 1.05)
    lines = [
        (label, [(x, y) for x, y in zip(grid, s, strict=True) if y is not None])
        for label, s in zip(labels, series, strict=True)
    ]
    return _line_chart(lines, x_max=grid[-1], y_max=top, y_unit=unit)


def _line_chart(
    lines: list[tuple[str, list[tuple[float, float]]]], *, x_max: float, y_max: float, y_unit: str
) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    x_max = x_max or 1.0

    def px(x: float) -> float:
        return LEFT + plot_w * x / x_max

    def py(y: float) -> float:
        return TOP + plot_h * (1 - min(y, y_max) / y_max)

    parts = [_axes(x_max, y_max, y_unit, "seconds of processing")]
    for i, (label, points) in enumerate(lines):
        if not points:
            continue
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<polyline stroke="{color}" points="{coords}"><title>{_e(label)}</title></polyline>')
    return _svg("".join(parts), HEIGHT) + _legend(
        (label, PALETTE[i % len(PALETTE)]) for i, (label, _) in enumerate(lines)
    )


def _axes(x_max: float, y_max: float, y_unit: str, x_caption: str) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = []
    for i in range(5):
        y = y_max * i / 4
        yy = TOP + plot_h * (1 - i / 4)
        parts.append(f'<line class="axis" x1="{LEFT}" y1="{yy:.1f}" x2="{WIDTH - RIGHT}" y2="{yy:.1f}"/>')
        parts.append(
            f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">{_e(_fmt(y))} {_e(y_unit)}</text>'
        )
    for i in range(6):
        xx = LEFT + plot_w * i / 5
        parts.append(
            f'<text x="{xx:.1f}" y="{HEIGHT - 12}" text-anchor="middle">{_e(_fmt(x_max * i / 5))}</text>'
        )
    parts.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 1}" text-anchor="end">{_e(x_caption)}</text>')
    return "".join(parts)


def _svg(content: str, height: int) -> str:
    return f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img">{content}</svg>'


def _legend(items) -> str:
    cells = "".join(f'<span><i style="background:{color}"></i>{_e(label)}</span>' for label, color in items)
    return f'<div class="legend">{cells}</div>'


def startup_steps(ranks: Sequence[dict], *, gpu: bool) -> list[tuple[str, list[tuple[str, float]]]]:
    """Each rank's start-up as (label, [(step, seconds it took)]), in the order the steps happen."""
    out = []
    for r in ranks:
        done_at = r.get("setup_done_at")
        if not isinstance(done_at, dict) or not done_at:
            continue
        previous, steps = 0.0, []
        for key, caption in STARTUP_STEPS:
            if key not in done_at:
                continue
            if key == "warmed_up" and "first_forward" not in done_at:
                caption = "Warm-up"
            if not gpu and key in ("first_forward", "warmed_up"):
                caption = "Warm-up"
            at = float(done_at[key])
            steps.append((caption, max(0.0, at - previous)))
            previous = max(previous, at)
        out.append((f"rank {r.get('rank', len(out))}", steps))
    return out


def startup_chart(ranks: list[tuple[str, list[tuple[str, float]]]]) -> str:
    """Stacked horizontal bars, one per rank, and a table of each step's time (rank 0 and slowest)."""
    shown = ranks[:STARTUP_RANKS_SHOWN]
    captions: list[str] = []
    for _, steps in ranks:
        captions += [c for c, _ in steps if c not in captions]
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(captions)}
    total = max(sum(s for _, s in steps) for _, steps in ranks) or 1.0
    x_max = _nice_ceiling(total)
    bar, gap = 18, 8
    height = TOP + len(shown) * (bar + gap) + BOTTOM
    plot_w = WIDTH - LEFT - RIGHT
    parts = []
    for i in range(6):
        xx = LEFT + plot_w * i / 5
        parts.append(f'<line class="axis" x1="{xx:.1f}" y1="{TOP}" x2="{xx:.1f}" y2="{height - BOTTOM}"/>')
        parts.append(
            f'<text x="{xx:.1f}" y="{height - 14}" text-anchor="middle">{_e(_fmt(x_max * i / 5))} s</text>'
        )
    for row, (label, steps) in enumerate(shown):
        y = TOP + row * (bar + gap)
        parts.append(f'<text x="{LEFT - 6}" y="{y + bar - 5}" text-anchor="end">{_e(label)}</text>')
        x = 0.0
        for caption, seconds in steps:
            w = plot_w * seconds / x_max
            parts.append(
                f'<rect x="{LEFT + plot_w * x / x_max:.1f}" y="{y}" width="{w:.1f}" height="{bar}" '
                f'fill="{colors[caption]}"><title>{_e(label)}: {_e(caption)} {seconds:.2f} s</title></rect>'
            )
            x += seconds
    more = (
        f'<p class="muted">The first {len(shown)} of {len(ranks)} ranks are drawn; the table covers all.</p>'
        if len(ranks) > len(shown)
        else ""
    )
    rows = []
    for caption in captions:
        per_rank = [sum(s for c, s in steps if c == caption) for _, steps in ranks]
        rows.append(
            f'<tr><td><i style="display:inline-block;width:10px;height:10px;background:{colors[caption]}"></i> '
            f'{_e(caption)}</td><td class="n">{per_rank[0]:.2f} s</td><td class="n">{max(per_rank):.2f} s</td></tr>'
        )
    table = (
        '<table><thead><tr><th>Step</th><th class="n">Rank 0</th><th class="n">Slowest rank</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return _svg("".join(parts), height) + more + table


def histogram(bins: Sequence[tuple[float, float, int]]) -> str:
    """Vertical bars, one per ``(low, high, count)`` bin."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    peak = _nice_ceiling(max(n for *_, n in bins) or 1)
    low, high = bins[0][0], bins[-1][1]
    width = plot_w / len(bins)
    parts = []
    for i in range(5):
        yy = TOP + plot_h * (1 - i / 4)
        parts.append(f'<line class="axis" x1="{LEFT}" y1="{yy:.1f}" x2="{WIDTH - RIGHT}" y2="{yy:.1f}"/>')
        parts.append(
            f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">{_e(_fmt(peak * i / 4))}</text>'
        )
    for i, (lo, hi, n) in enumerate(bins):
        h = plot_h * n / peak
        parts.append(
            f'<rect x="{LEFT + i * width + 1:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(width - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{PALETTE[0]}"><title>{lo:.4g} to {hi:.4g}: {n:,}</title></rect>'
        )
    for i in range(6):
        xx = LEFT + plot_w * i / 5
        parts.append(
            f'<text x="{xx:.1f}" y="{HEIGHT - 12}" text-anchor="middle">{low + (high - low) * i / 5:.3g}</text>'
        )
    return _svg("".join(parts), HEIGHT)


def bars(items: Sequence[tuple[str, int]]) -> str:
    """Horizontal bars of counts, as HTML (the labels wrap and ellipsize as text does)."""
    peak = max(count for _, count in items) or 1
    rows = "".join(
        f'<div class="label" title="{_e(name)}">{_e(name)}</div>'
        f'<div class="track"><div class="fill" style="width:{100.0 * count / peak:.1f}%"></div></div>'
        f'<div class="n">{count:,}</div>'
        for name, count in items
    )
    return f'<div class="bars">{rows}</div>'
