"""Charts as inline SVG drawn on the server: no script, no library, nothing from elsewhere.

A stacked bar chart a day: each bar's parts are the series, each part has a ``<title>`` (its
value, shown on hover and read by screen readers), the axis shows a few dates and the top value.
Colours come from the stylesheet (``.s0`` … ``.s7``), so the chart follows the page's theme.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH = 720
HEIGHT = 220
LEFT = 40
BOTTOM = 24
TOP = 10


def _nice(top: int) -> int:
    """A round number at or above ``top`` for the axis."""
    if top <= 10:
        return max(2, top + top % 2)  # even, so the middle line is a whole number
    magnitude = 10 ** (len(str(top)) - 1)
    for step in (1, 2, 2.5, 5, 10):
        value = int(step * magnitude)
        if value >= top:
            return value
    return top


def bars(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[int]]],
    *,
    css: str = "",
    height: int = HEIGHT,
) -> Markup:
    """A stacked bar chart: ``labels`` (dates) along the bottom, ``series`` (name, values)."""
    count = max(1, len(labels))
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    top = _nice(max(totals, default=0))
    plot_w = WIDTH - LEFT - 4
    plot_h = height - BOTTOM - TOP
    step = plot_w / count
    bar_w = max(2.0, step * 0.72)
    parts: list[str] = [
        f'<svg class="chart {escape(css)}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(title)}</title>",
    ]
    for frac in (0, 0.5, 1):
        y = TOP + plot_h * (1 - frac)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - 4}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_short(int(top * frac))}</text>"
        )
    for i, label in enumerate(labels):
        x = LEFT + i * step + (step - bar_w) / 2
        y = TOP + plot_h
        for s, (name, values) in enumerate(series):
            value = values[i]
            if not value:
                continue
            h = plot_h * value / top
            y -= h
            parts.append(
                f'<rect class="s{s}" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                f'height="{max(h, 0.5):.1f}"><title>{escape(label)}: {value} '
                f"{escape(name)}</title></rect>"
            )
    every = max(1, round(count / 6))
    for i, label in enumerate(labels):
        last = i == count - 1
        if i % every == 0 or (last and i % every > every / 2):
            x = LEFT + i * step + step / 2
            anchor = "middle"
            if last and count > 1:
                x, anchor = WIDTH - 4, "end"  # inside the picture, not cut at its edge
            parts.append(
                f'<text class="axis" x="{x:.1f}" y="{height - 6}" text-anchor="{anchor}">'
                f"{escape(label[5:])}</text>"
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="key s{s}"></span>{escape(name)} '
        f'<span class="muted">{sum(values)}</span></li>'
        for s, (name, values) in enumerate(series)
    )
    return Markup(f'{"".join(parts)}<ul class="legend">{legend}</ul>')


def _short(value: int) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return str(value)
