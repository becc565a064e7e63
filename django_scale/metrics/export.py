"""Prometheus text exposition (format 0.0.4) of a snapshot, written by hand.

Why not ``prometheus_client``: its registry and multiprocess mode are what this package
replaces (one file per pid, scrapes that grow with recycled workers), and rendering text is
a few lines. The output is checked against ``prometheus_client``'s own parser in the tests.

Timings are summaries: quantiles 0.5, 0.95, 0.99 and 0.999 over one sliding window (5
minutes unless asked otherwise) and ``_count`` / ``_sum`` since the file was created, which
never go down. Counters are ``_total`` counters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import lru_cache

from django_scale.metrics.recording import SEP
from django_scale.metrics.store import HostSnapshot

__all__ = ["QUANTILES", "prometheus_text", "split_name"]

#: The quantiles every timing reports.
QUANTILES = (0.5, 0.95, 0.99, 0.999)

_TIMINGS = {
    "request": ("django_scale_request_seconds", ("route", "method"), "Request latency by route and method."),
    "db": (
        "django_scale_db_seconds",
        ("route", "method", "alias"),
        "DB time of a request, per database alias.",
    ),
    "queue": (
        "django_scale_queue_seconds",
        ("route", "method"),
        "Time between the proxy's X-Request-Start and the request's start.",
    ),
}
_COUNTERS = {
    "requests": (
        "django_scale_requests",
        ("route", "method", "status"),
        "Requests by route, method and status class.",
    ),
    "queries": (
        "django_scale_db_queries",
        ("route", "method", "alias"),
        "Queries by route, method and alias.",
    ),
    "reads": (
        "django_scale_routed_reads",
        ("route", "method", "alias"),
        "Read routing decisions by route and the alias they chose.",
    ),
    "fallbacks": (
        "django_scale_replica_fallbacks",
        ("route", "method"),
        "Reads meant for a replica that went to the primary because none could serve them "
        "(lag, ejection, an open breaker, a failed read), by route.",
    ),
    "event": (
        "django_scale_route_events",
        ("route", "method", "event"),
        "django-scale events (cache hits, stale serves, refills, counts, N+1) by route.",
    ),
    "counter": ("django_scale_events", ("event",), "django-scale events of every process of the host."),
}


def split_name(name: str) -> tuple[str, list[str]]:
    """Return the kind and labels of a series name (``"request\\x1fnews:article\\x1fGET"``)."""
    kind, *labels = name.split(SEP)
    return kind, labels


def _escape(value: str) -> str:
    if "\\" not in value and "\n" not in value and '"' not in value:
        return value
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(kinds: dict[str, tuple[str, tuple[str, ...], str]], name: str) -> tuple[str, str] | None:
    """Return the family of series *name* among *kinds* and its labels' text, without braces.

    Made by one ``%`` formatting of a per-family template (:func:`_template`); the values are
    escaped one by one only when the name holds a character to escape.
    """
    kind, values = split_name(name)
    spec = kinds.get(kind)
    if spec is None or len(values) != len(spec[1]):
        return None
    if "\\" in name or "\n" in name or '"' in name:
        values = [_escape(value) for value in values]
    return spec[0], _template(spec[1]) % tuple(values)


@lru_cache(maxsize=16)
def _template(label_names: tuple[str, ...]) -> str:
    return ",".join(f'{label}="%s"' for label in label_names)


def _number(value: float) -> str:
    return repr(float(value)) if value == value else "NaN"


# Series names and bucket representatives recur on every scrape: their text is kept. Both are
# bounded: by the series a metrics file holds (METRICS_SERIES timings, four times as many
# counters, per process) and by the sketch's buckets.
_SERIES_TEXT = 1 << 16


@lru_cache(maxsize=_SERIES_TEXT)
def _timing_text(name: str) -> tuple[str, str, str, str] | None:
    """Return the family and the text before each value of timing series *name*."""
    found = _labels(_TIMINGS, name)
    if found is None:
        return None
    metric, labels = found
    return (
        metric,
        f"{metric}{{{labels},quantile=",
        f"{metric}_sum{{{labels}}} ",
        f"{metric}_count{{{labels}}} ",
    )


@lru_cache(maxsize=_SERIES_TEXT)
def _counter_text(name: str) -> tuple[str, str] | None:
    """Return the family and the text before the value of counter series *name*."""
    found = _labels(_COUNTERS, name)
    if found is None:
        return None
    metric, labels = found
    return metric, f"{metric}_total{{{labels}}} "


@lru_cache(maxsize=4096)
def _quantile_text(q: float, value: float | None) -> str:
    return f'"{q}"}} {_number(value or 0.0)}\n'


def prometheus_text(snapshot: HostSnapshot, window: int = 5, gauges: Iterable[str] = ()) -> str:
    """Render *snapshot* in Prometheus text format; *gauges* are extra ready-made lines."""
    # Each family's lines as pieces, most of them kept texts (a series' label text, a quantile's
    # value): one join at the end makes the document, with no string per line before it.
    families: dict[str, list[str]] = defaultdict(list)
    windows = snapshot.windows
    for name, (count, total) in sorted(snapshot.totals.items()):
        text = _timing_text(name)
        if text is None:
            continue
        metric, quantile, sum_, count_ = text
        sketch = windows.get(name, {}).get(window)
        pieces = families[metric]
        if sketch is not None:
            # The quantiles before the count: a dense sketch counts its values on the way.
            quantiles = sketch.quantiles(QUANTILES)
            if sketch.count:
                # Quantiles are bucket representatives: a few hundred distinct texts.
                for q, value in quantiles.items():
                    pieces += (quantile, _quantile_text(q, value))
        pieces += (sum_, _number(total), "\n", count_, str(count), "\n")
    for name, value in sorted(snapshot.counters.items()):
        counter = _counter_text(name)
        if counter is not None:
            families[counter[0]] += (counter[1], str(value), "\n")
    out: list[str] = []
    for metric, _, help_text in _TIMINGS.values():
        if families.get(metric):
            out.append(f"# HELP {metric} {help_text} Quantiles over the last {window} minutes.\n")
            out.append(f"# TYPE {metric} summary\n")
            out.extend(families[metric])
    for metric, _, help_text in _COUNTERS.values():
        if families.get(metric):
            # Text format 0.0.4 names a counter family with its _total suffix.
            out.append(f"# HELP {metric}_total {help_text}\n")
            out.append(f"# TYPE {metric}_total counter\n")
            out.extend(families[metric])
    out.append(
        "# HELP django_scale_metrics_slots Worker slots of the host's metrics file: live and ever used.\n"
    )
    out.append("# TYPE django_scale_metrics_slots gauge\n")
    out.append(f'django_scale_metrics_slots{{state="live"}} {snapshot.live_slots}\n')
    out.append(f'django_scale_metrics_slots{{state="used"}} {snapshot.used_slots}\n')
    out.append(
        "# HELP django_scale_metrics_dropped Values not recorded: no free slot, or a slot's bucket pool full.\n"
    )
    out.append("# TYPE django_scale_metrics_dropped gauge\n")
    out.append(f"django_scale_metrics_dropped {snapshot.dropped}\n")
    for line in gauges:
        out += (line, "\n")
    return "".join(out)
