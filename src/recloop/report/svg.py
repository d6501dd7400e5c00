"""Inline SVG charts drawn in Python: no JavaScript, no CDN, nothing to fetch.

A report must open offline years from now, so each chart is a static ``<svg>`` string with
its numbers in ``<title>`` tooltips and ``data-*`` attributes (which the browser tests read).
Three shapes cover every figure: lines (optionally log axes, markers, bands), horizontal
interval rows (a point with its interval, an optional true value beside it) and bars.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
"""Category colours (matplotlib's tab10): distinguishable, and known to most readers."""

WIDTH, HEIGHT = 560, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 28, 46


@dataclass(frozen=True, kw_only=True)
class Series:
    """One line of a line chart."""

    name: str
    """Legend label."""
    x: Sequence[float]
    """X values, increasing."""
    y: Sequence[float]
    """Y values, one per x."""
    lo: Sequence[float] | None = None
    """Lower edge of a band around the line (same length as y), or None."""
    hi: Sequence[float] | None = None
    """Upper edge of the band, or None."""
    marks: Sequence[int] = ()
    """Indices of points to mark with a larger ringed dot (e.g. the best epoch)."""
    points: bool = True
    """Draw a dot at every point (off for long series such as events over time)."""


@dataclass(frozen=True, kw_only=True)
class Interval:
    """One row of an interval chart: a point estimate, its interval and a reference."""

    label: str
    value: float
    lo: float | None = None
    hi: float | None = None
    truth: float | None = None
    """The true value (from a world), drawn as a diamond."""
    group: str = ""
    """Colour group (e.g. the estimator); rows of one group share a colour."""


@dataclass(frozen=True, kw_only=True)
class Bars:
    """A bar chart: one bar per category per series (grouped)."""

    categories: Sequence[str]
    series: Mapping[str, Sequence[float]] = field(default_factory=dict)
    """Series name → one value per category."""
    lo: Mapping[str, Sequence[float]] | None = None
    """Series name → lower interval edges (error bars), optional."""
    hi: Mapping[str, Sequence[float]] | None = None


def fmt(v: float) -> str:
    """A number as charts and tables print it: 4 significant digits, integers in full."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (1, 2, 5 × 10^k steps)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out = []
    t = first
    while t <= hi + step * 1e-9:
        out.append(round(t, 12))
        t += step
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


class _Axis:
    """Maps data values to pixels, linear or log10."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, *, log: bool) -> None:
        self.log = log
        if log:
            lo, hi = max(lo, 1e-12), max(hi, 1e-12)
            lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        elif hi == lo:
            lo, hi = lo - 0.5 if lo else -1.0, hi + 0.5 if hi else 1.0
        self.lo, self.hi, self.p0, self.p1 = lo, hi, p0, p1

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, 1e-12)
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.p0 + t * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        return _log_ticks(self.lo, self.hi) if self.log else _ticks(self.lo, self.hi)


def _legend_rows(names: Sequence[str]) -> tuple[list[str], int]:
    """Legend entries in rows under the title (never over the data), and the extra top
    margin they take."""
    if not names or (len(names) == 1 and not names[0]):
        return [], 0
    out, x, row = [], float(MARGIN_L), 0
    for i, name in enumerate(names):
        w = 14 + 6.0 * len(name) + 14  # swatch, text at ~6 px a character, gap
        if x + w > WIDTH - MARGIN_R and x > MARGIN_L:
            x, row = float(MARGIN_L), row + 1
        y = MARGIN_T + 2 + 14 * row
        c = PALETTE[i % len(PALETTE)]
        out.append(
            f'<rect x="{x:.0f}" y="{y - 8}" width="10" height="10" fill="{c}"/>'
            f'<text x="{x + 14:.0f}" y="{y + 1}" class="l">{escape(name)}</text>'
        )
        x += w
    return out, 14 * (row + 1) + 4


def _open(chart_id: str, title: str, height: int = HEIGHT) -> list[str]:
    return [
        f'<svg class="chart" id="{escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" class="t">{escape(title)}</text>',
    ]


def _frame(
    xa: _Axis,
    ya: _Axis,
    *,
    x_label: str,
    y_label: str,
    height: int,
    top: int = MARGIN_T,
    x_ticks: bool = True,
    integer_x: bool = False,
) -> list[str]:
    bottom = height - MARGIN_B
    out = [
        f'<line x1="{MARGIN_L}" y1="{bottom}" x2="{WIDTH - MARGIN_R}" y2="{bottom}" class="ax"/>',
        f'<line x1="{MARGIN_L}" y1="{top}" x2="{MARGIN_L}" y2="{bottom}" class="ax"/>',
    ]
    for t in ya.ticks():
        y = ya(t)
        out.append(
            f'<line x1="{MARGIN_L}" y1="{y:.1f}" x2="{WIDTH - MARGIN_R}" y2="{y:.1f}" class="g"/>'
            f'<text x="{MARGIN_L - 4}" y="{y + 3:.1f}" text-anchor="end" class="k">{fmt(t)}</text>'
        )
    if x_ticks:
        ticks = xa.ticks()
        if integer_x:  # epochs and rounds: no tick at 1.5
            ticks = sorted({float(round(t)) for t in ticks if abs(t - round(t)) < 1e-9})
            if len(ticks) < 2:
                ticks = [float(v) for v in range(math.ceil(xa.lo), math.floor(xa.hi) + 1)]
        for t in ticks:
            x = xa(t)
            out.append(
                f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" class="k">'
                f"{fmt(t)}</text>"
            )
    out.append(
        f'<text x="{(MARGIN_L + WIDTH - MARGIN_R) / 2}" y="{height - 8}" text-anchor="middle" '
        f'class="a">{escape(x_label)}</text>'
        f'<text x="14" y="{(top + bottom) / 2}" text-anchor="middle" class="a" '
        f'transform="rotate(-90 14 {(top + bottom) / 2})">{escape(y_label)}</text>'
    )
    return out


def line_chart(
    chart_id: str,
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    log_y: bool = False,
    x_format: str | None = None,
    integer_x: bool = False,
) -> str:
    """Lines (with optional bands and marked points) on shared axes.

    ``x_format="date"`` labels x ticks as UTC dates (x in Unix seconds); ``integer_x`` puts
    ticks on whole numbers only (epochs, rounds).
    """
    xs = [float(v) for s in series for v in s.x]
    ys = [float(v) for s in series for v in s.y]
    ys += [float(v) for s in series for band in (s.lo, s.hi) if band is not None for v in band]
    if log_x:
        xs = [v for v in xs if v > 0]
    if log_y:
        ys = [v for v in ys if v > 0]
    xs = xs or [0.0, 1.0]
    ys = ys or [0.0, 1.0]
    y_lo = min(ys) if log_y else min(0.0, min(ys))
    legend, extra = _legend_rows([s.name for s in series])
    top = MARGIN_T + extra
    xa = _Axis(min(xs), max(xs), MARGIN_L + 6, WIDTH - MARGIN_R - 6, log=log_x)
    ya = _Axis(y_lo, max(ys), HEIGHT - MARGIN_B, top + 6, log=log_y)
    out = _open(chart_id, title) + legend
    out += _frame(
        xa, ya, x_label=x_label, y_label=y_label, height=HEIGHT, top=top,
        x_ticks=not x_format, integer_x=integer_x,
    )  # fmt: skip
    if x_format == "date":
        import datetime as dt

        for t in _ticks(xa.lo, xa.hi, 4):
            day = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d")
            out.append(
                f'<text x="{xa(t):.1f}" y="{HEIGHT - MARGIN_B + 14}" text-anchor="middle" '
                f'class="k">{day}</text>'
            )
    n_points = 0
    for i, s in enumerate(series):
        c = PALETTE[i % len(PALETTE)]
        pts = [
            (xa(float(x)), ya(float(y)))
            for x, y in zip(s.x, s.y, strict=True)
            if (not log_x or x > 0) and (not log_y or y > 0) and math.isfinite(float(y))
        ]
        if s.lo is not None and s.hi is not None and len(s.x) > 1:
            upper = [
                f"{xa(float(x)):.1f},{ya(float(h)):.1f}" for x, h in zip(s.x, s.hi, strict=True)
            ]
            lower = [
                f"{xa(float(x)):.1f},{ya(float(v)):.1f}" for x, v in zip(s.x, s.lo, strict=True)
            ]
            out.append(
                f'<polygon points="{" ".join(upper + lower[::-1])}" fill="{c}" opacity="0.15"/>'
            )
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.6" '
                f'data-series="{escape(s.name)}"/>'
            )
        for j, (x, y) in enumerate(zip(s.x, s.y, strict=True)):
            if (log_x and x <= 0) or (log_y and y <= 0) or not math.isfinite(float(y)):
                continue
            px, py = xa(float(x)), ya(float(y))
            tip = f"{s.name}: x={fmt(float(x))}, y={fmt(float(y))}"
            if j in s.marks:
                out.append(
                    f'<circle cx="{px:.1f}" cy="{py:.1f}" r="6" fill="none" stroke="{c}" '
                    f'stroke-width="2" class="mark" data-x="{x}" data-y="{y}">'
                    f"<title>{escape(tip)} (best)</title></circle>"
                )
            if s.points or len(s.x) == 1:
                out.append(
                    f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{c}" class="pt" '
                    f'data-x="{x}" data-y="{y}"><title>{escape(tip)}</title></circle>'
                )
            n_points += 1
    out.append("</svg>")
    out[0] = out[0].replace("<svg ", f'<svg data-points="{n_points}" ', 1)
    return "".join(out)


def interval_chart(
    chart_id: str, title: str, rows: Sequence[Interval], *, x_label: str, zero: bool = False
) -> str:
    """One horizontal row per estimate: a dot, its interval as a whisker and the true value
    (where known) as a hollow diamond.  ``zero`` keeps 0 on the axis."""
    row_h = 20
    height = MARGIN_T + 14 + row_h * max(len(rows), 1) + MARGIN_B
    vals: list[float] = []
    for r in rows:
        vals += [v for v in (r.value, r.lo, r.hi, r.truth) if v is not None and math.isfinite(v)]
    vals = vals or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = (hi - lo) * 0.05 or 0.5
    left = 190
    xa = _Axis(lo - pad, hi + pad, left, WIDTH - MARGIN_R - 6, log=False)
    out = _open(chart_id, title, height)
    bottom = height - MARGIN_B
    out.append(
        f'<line x1="{left}" y1="{bottom}" x2="{WIDTH - MARGIN_R}" y2="{bottom}" class="ax"/>'
    )
    for t in xa.ticks():
        x = xa(t)
        out.append(
            f'<line x1="{x:.1f}" y1="{MARGIN_T}" x2="{x:.1f}" y2="{bottom}" class="g"/>'
            f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" class="k">{fmt(t)}</text>'
        )
    out.append(
        f'<text x="{(left + WIDTH) / 2}" y="{height - 8}" text-anchor="middle" class="a">'
        f"{escape(x_label)}</text>"
    )
    groups = list(dict.fromkeys(r.group for r in rows))
    for i, r in enumerate(rows):
        y = MARGIN_T + 14 + row_h * i
        c = PALETTE[groups.index(r.group) % len(PALETTE)]
        out.append(
            f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" class="l">{escape(r.label)}</text>'
        )
        tip = f"{r.label}: {fmt(r.value)}"
        if r.lo is not None and r.hi is not None:
            tip += f" [{fmt(r.lo)}, {fmt(r.hi)}]"
            out.append(
                f'<line x1="{xa(r.lo):.1f}" y1="{y}" x2="{xa(r.hi):.1f}" y2="{y}" stroke="{c}" '
                f'stroke-width="2"/>'
            )
        if r.truth is not None:
            tx = xa(r.truth)
            out.append(
                f'<path d="M{tx:.1f},{y - 6} l6,6 l-6,6 l-6,-6 z" fill="none" stroke="#000" '
                f'class="truth" data-value="{r.truth}"><title>{escape(r.label)}: true value '
                f"{fmt(r.truth)}</title></path>"
            )
            tip += f"; truth {fmt(r.truth)}"
        out.append(
            f'<circle cx="{xa(r.value):.1f}" cy="{y}" r="4" fill="{c}" class="pt" '
            f'data-value="{r.value}"><title>{escape(tip)}</title></circle>'
        )
    out.append("</svg>")
    out[0] = out[0].replace("<svg ", f'<svg data-points="{len(rows)}" ', 1)
    return "".join(out)


def bar_chart(
    chart_id: str, title: str, bars: Bars, *, x_label: str, y_label: str, log_y: bool = False
) -> str:
    """Grouped vertical bars, one group per category, with optional error bars."""
    names = list(bars.series)
    vals = [float(v) for s in bars.series.values() for v in s]
    for edges in (bars.lo, bars.hi):
        if edges:
            vals += [float(v) for s in edges.values() for v in s]
    if log_y:
        vals = [v for v in vals if v > 0] or [1.0]
    legend, extra = _legend_rows(names)
    top = MARGIN_T + extra
    y_lo = min(vals) if log_y else min(0.0, *vals)
    ya = _Axis(y_lo, max(vals), HEIGHT - MARGIN_B, top + 6, log=log_y)
    out = _open(chart_id, title) + legend
    xa = _Axis(0, 1, MARGIN_L, WIDTH - MARGIN_R, log=False)
    out += _frame(xa, ya, x_label=x_label, y_label=y_label, height=HEIGHT, top=top, x_ticks=False)
    n_cat = max(len(bars.categories), 1)
    slot = (WIDTH - MARGIN_R - MARGIN_L) / n_cat
    bar_w = slot * 0.8 / max(len(names), 1)
    base = ya(ya.lo) if log_y else ya(0.0)
    n_bars = 0
    every = max(1, math.ceil(n_cat / 16))  # at most ~16 category labels fit
    for ci, cat in enumerate(bars.categories):
        x0 = MARGIN_L + slot * ci + slot * 0.1
        if ci % every == 0:
            out.append(
                f'<text x="{MARGIN_L + slot * (ci + 0.5):.1f}" y="{HEIGHT - MARGIN_B + 14}" '
                f'text-anchor="middle" class="k">{escape(cat)}</text>'
            )
        for si, name in enumerate(names):
            v = float(bars.series[name][ci])
            c = PALETTE[si % len(PALETTE)]
            x = x0 + bar_w * si
            if log_y and v <= 0:
                continue
            y = ya(v)
            tip = f"{name} {cat}: {fmt(v)}"
            if bars.lo and bars.hi and name in bars.lo:
                lo, hi = float(bars.lo[name][ci]), float(bars.hi[name][ci])
                tip += f" [{fmt(lo)}, {fmt(hi)}]"
            out.append(
                f'<rect x="{x:.1f}" y="{min(y, base):.1f}" width="{max(bar_w - 1, 1):.1f}" '
                f'height="{abs(base - y):.1f}" fill="{c}" class="bar" data-value="{v}">'
                f"<title>{escape(tip)}</title></rect>"
            )
            if bars.lo and bars.hi and name in bars.lo:
                cx = x + bar_w / 2
                out.append(
                    f'<line x1="{cx:.1f}" y1="{ya(lo):.1f}" x2="{cx:.1f}" y2="{ya(hi):.1f}" '
                    f'stroke="#000" stroke-width="1.2"/>'
                )
            n_bars += 1
    out.append("</svg>")
    out[0] = out[0].replace("<svg ", f'<svg data-points="{n_bars}" ', 1)
    return "".join(out)
