"""``bench site``'s plots for the docs, as SVG files: no plotting library.

* :func:`timeline_svg`: per fault, the p50 and p99 latency of each 0.5 s window of the
  fixed-rate run over time, the fault's window shaded, errors marked;
* :func:`bars_svg`: per page, the p99 of each configuration at 80 % of stock's capacity, and
  each configuration's capacity (log scale: the ratios are the point).

django-scale's own SVG charts (``django_scale.metrics.charts``) are the status page's: a
minute axis ending "now", no shaded spans; these are drawn over seconds and pages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

__all__ = ["bars_svg", "timeline_svg"]

COLOURS = {"stock": "#d9534f", "tuned": "#f0ad4e", "scale": "#2f7ed8", "p50": "#5cb85c", "p99": "#2f7ed8"}
FONT = 'font-family="sans-serif" font-size="11"'


def _svg(width: int, height: int, title: str, parts: Sequence[str]) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">',
            f"<title>{escape(title)}</title>",
            f'<rect width="{width}" height="{height}" fill="white"/>',
            *parts,
            "</svg>\n",
        ]
    )


def _panel(fault: dict[str, Any], x0: float, y0: float, w: float, h: float, peak: float) -> list[str]:
    """One fault's latency over time, in the box (x0, y0, w, h), y from 0 to *peak* seconds."""
    rows = fault["timeline"]
    span = max((row["t"] for row in rows), default=1.0) + 0.5
    window = fault["window"]

    def x(t: float) -> float:
        return x0 + w * t / span

    def y(value: float) -> float:
        return y0 + h * (1 - min(value, peak) / peak)

    parts = [
        f'<rect x="{x(window["injected"]):.1f}" y="{y0}" width="{x(window["recovered"]) - x(window["injected"]):.1f}"'
        f' height="{h}" fill="#f2dede"/>',
        f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="#999"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + h}" stroke="#999"/>',
        f'<text x="{x0}" y="{y0 - 4}" {FONT} font-weight="bold">{escape(fault["fault"])}</text>',
        f'<text x="{x0 - 4}" y="{y0 + 8}" {FONT} text-anchor="end">{peak * 1000:.0f} ms</text>',
        f'<text x="{x0 - 4}" y="{y0 + h}" {FONT} text-anchor="end">0</text>',
        f'<text x="{x0 + w}" y="{y0 + h + 13}" {FONT} text-anchor="end">{span:.0f} s</text>',
    ]
    for key in ("p50", "p99"):
        points = " ".join(
            f"{x(row['t'] + 0.25):.1f},{y(row[key]):.1f}"
            for row in rows
            if row["requests"] and row[key] == row[key]
        )
        parts.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS[key]}" stroke-width="1.5"/>')
    for row in rows:
        if row["errors"]:
            parts.append(f'<circle cx="{x(row["t"] + 0.25):.1f}" cy="{y0 + h - 3}" r="3" fill="#d9534f"/>')
    return parts


def timeline_svg(results: dict[str, Any]) -> str:
    """Latency over time of every fault run (one row of panels per configuration)."""
    configs = {
        name: figures["faults"]["faults"]
        for name, figures in results["configs"].items()
        if "faults" in figures
    }
    columns = 3
    pw, ph, gap = 260, 120, 50
    lines = [
        (config, faults[i : i + columns])
        for config, faults in configs.items()
        for i in range(0, len(faults), columns)
    ]
    width, height = 70 + columns * (pw + 30), 40 + len(lines) * (ph + gap)
    parts = [
        f'<text x="10" y="16" {FONT}>p50 (green) and p99 (blue) latency of each 0.5 s window, from the intended'
        " send time; the fault's window shaded; red dots: errors; the axis stops at 2 s.</text>"
    ]
    peaks = {
        config: min(
            max(
                max(
                    (
                        r["p99"]
                        for f in faults
                        for r in f["timeline"]
                        if r["requests"] and r["p99"] == r["p99"]
                    ),
                    default=0.001,
                ),
                0.001,
            ),
            2.0,
        )
        for config, faults in configs.items()
    }
    for row, (config, faults) in enumerate(lines):
        for column, fault in enumerate(faults):
            box = (70 + column * (pw + 30), 40 + row * (ph + gap), pw, ph)
            parts += _panel({**fault, "fault": f"{config}: {fault['fault']}"}, *box, peaks[config])
    return _svg(width, height, "bench site: latency through the faults", parts)


def bars_svg(results: dict[str, Any]) -> str:
    """p99 per page at 80 % of stock's capacity, and capacity, per configuration (log scale)."""
    configs = list(results["configs"])
    pages = list(results["configs"][configs[0]]["open 80%"]["pages"])
    groups: list[tuple[str, dict[str, float]]] = [
        (
            f"{page} p99 (ms)",
            {
                c: 1000 * results["configs"][c]["open 80%"]["pages"].get(page, {}).get("p99", math.nan)
                for c in configs
            },
        )
        for page in pages
    ]
    groups.append(("capacity (req/s)", {c: results["configs"][c]["capacity"]["rate"] for c in configs}))
    values = [v for _, group in groups for v in group.values() if v == v and v > 0]
    low, high = math.log10(min(values, default=1.0)) - 0.3, math.log10(max(values, default=10.0)) + 0.3
    bw, gw, h, top = 18, 18 * len(configs) + 30, 220, 40
    width, height = 60 + len(groups) * gw, top + h + 70

    def y(value: float) -> float:
        return top + h * (1 - (math.log10(value) - low) / (high - low))

    parts = [
        f'<text x="10" y="16" {FONT}>p99 per page at 80 % of stock\'s capacity, and capacity; log scale. '
        + " ".join(f'<tspan fill="{COLOURS.get(c, "#777")}">&#9632; {escape(c)}</tspan>' for c in configs)
        + "</text>",
        f'<line x1="50" y1="{top + h}" x2="{width}" y2="{top + h}" stroke="#999"/>',
    ]
    for index, (label, group) in enumerate(groups):
        gx = 60 + index * gw
        for n, config in enumerate(configs):
            value = group[config]
            if not (value == value and value > 0):
                continue
            bx = gx + n * bw
            parts.append(
                f'<rect x="{bx}" y="{y(value):.1f}" width="{bw - 2}" height="{top + h - y(value):.1f}" '
                f'fill="{COLOURS.get(config, "#777")}"><title>{escape(config)}: {value:.3g}</title></rect>'
            )
            parts.append(
                f'<text x="{bx + bw / 2 - 1}" y="{y(value) - 3:.1f}" font-family="sans-serif" font-size="8" text-anchor="middle">{value:.3g}</text>'
            )
        parts.append(
            f'<text x="{gx}" y="{top + h + 14}" {FONT} transform="rotate(20 {gx} {top + h + 14})">{escape(label)}</text>'
        )
    return _svg(width, height, "bench site: stock, hand-tuned and django-scale", parts)
