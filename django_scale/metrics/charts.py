"""Server-rendered SVG line charts for the status page: no JavaScript, no build step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

__all__ = ["line_chart"]

#: Line colours, in order of the series (readable on the admin's light and dark themes).
COLOURS = ("#2f7ed8", "#d9534f", "#5cb85c", "#f0ad4e")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def line_chart(
    lines: Mapping[str, Sequence[tuple[int, float | None]]],
    minutes: Sequence[int],
    *,
    title: str,
    width: int = 360,
    height: int = 120,
) -> SafeString:
    """Return an SVG chart of *lines* (label -> ``(minute, seconds)`` points) over *minutes*.

    The y axis starts at 0 and ends at the largest value; a minute without a value breaks its
    line. Every text is escaped.
    """
    left, right, top, bottom = 52, 8, 18, 18
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [value for points in lines.values() for _, value in points if value is not None]
    peak = max(values, default=0.0) or 1e-3
    first, last = minutes[0], minutes[-1]
    span = max(last - first, 1)

    def x(minute: int) -> float:
        return left + plot_w * (minute - first) / span

    def y(value: float) -> float:
        return top + plot_h * (1 - value / peak)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="django-scale-chart" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" font-size="10" fill="currentColor">{_ms(peak)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" font-size="10" fill="currentColor">0</text>',
        f'<text x="{left}" y="{height - 4}" font-size="10" fill="currentColor">-{span} min</text>',
        f'<text x="{left + plot_w}" y="{height - 4}" text-anchor="end" font-size="10" fill="currentColor">now</text>',
    ]
    for index, (label, points) in enumerate(lines.items()):
        colour = COLOURS[index % len(COLOURS)]
        runs: list[list[str]] = [[]]
        by_minute = dict(points)
        for minute in range(first, last + 1):
            value = by_minute.get(minute)
            if value is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append(f"{x(minute):.1f},{y(value):.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle class="point" cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            elif run:
                parts.append(
                    f'<polyline class="line" points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
                )
        parts.append(
            f'<text x="{left + 6 + 60 * index}" y="{top - 6}" font-size="10" fill="{colour}">{escape(label)}</text>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 (every text above is escaped)
