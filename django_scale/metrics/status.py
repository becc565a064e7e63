"""The figures ``scale_status`` prints and the export adds: routes, replicas, cache, sniper."""

from __future__ import annotations

from typing import Any

from django_scale.conf import conf
from django_scale.metrics.export import QUANTILES, split_name
from django_scale.metrics.store import WINDOWS, HostSnapshot

__all__ = ["QUANTILE_NAMES", "replica_gauges", "replica_rows", "route_rows", "status_document"]

#: The key of each quantile in a route's figures.
QUANTILE_NAMES = {0.5: "p50", 0.95: "p95", 0.99: "p99", 0.999: "p999"}


def route_rows(snapshot: HostSnapshot, window: int = 5) -> list[dict[str, Any]]:
    """Return one row per (route, method): requests, percentiles per window, DB time, queries per
    request, and reads that fell back to the primary (``fallbacks``, since the file was created).

    Sorted slowest first by p99 over *window*.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, (count, total) in snapshot.totals.items():
        kind, labels = split_name(name)
        if kind != "request" or len(labels) != 2:
            continue
        windows = snapshot.windows.get(name, {})
        rows[(labels[0], labels[1])] = {
            "route": labels[0],
            "method": labels[1],
            "requests": count,
            "mean": total / count if count else None,
            "windows": {
                str(w): {
                    "requests": windows[w].count if w in windows else 0,
                    **{
                        QUANTILE_NAMES[q]: value
                        for q, value in (windows[w].quantiles(QUANTILES) if w in windows else {}).items()
                    },
                }
                for w in WINDOWS
            },
            "db_seconds": {},
            "queries": {},
            "fallbacks": 0,
        }
    for name, (_count, total) in snapshot.totals.items():
        kind, labels = split_name(name)
        row = rows.get((labels[0], labels[1])) if kind == "db" and len(labels) == 3 else None
        if row is not None and row["requests"]:
            row["db_seconds"][labels[2]] = total / row["requests"]
    for name, value in snapshot.counters.items():
        kind, labels = split_name(name)
        if kind == "fallbacks" and len(labels) == 2:
            row = rows.get((labels[0], labels[1]))
            if row is not None:
                row["fallbacks"] = value
            continue
        row = rows.get((labels[0], labels[1])) if kind == "queries" and len(labels) == 3 else None
        if row is not None and row["requests"]:
            row["queries"][labels[2]] = value / row["requests"]

    def p99(row: dict[str, Any]) -> float:
        return float(row["windows"][str(window)].get("p99") or 0.0)

    return sorted(rows.values(), key=p99, reverse=True)


def replica_rows(snapshot: HostSnapshot) -> list[dict[str, Any]]:
    """Return each database's reads, the primary's fallback reads, and each replica's availability,
    lag and error as this process sees them."""
    from django_scale.replicas import monitor  # replicas imports metrics: import at call time

    reads: dict[str, int] = {}
    fallbacks = 0
    for name, value in snapshot.counters.items():
        kind, labels = split_name(name)
        if kind == "reads" and len(labels) == 3:
            reads[labels[2]] = reads.get(labels[2], 0) + value
        elif kind == "fallbacks" and len(labels) == 2:
            fallbacks += value
    all_reads = sum(reads.values())
    rows = []
    for alias in (conf.PRIMARY, *conf.REPLICAS):
        row: dict[str, Any] = {
            "alias": alias,
            "role": "primary" if alias == conf.PRIMARY else "replica",
            "reads": reads.get(alias, 0),
            "read_share": reads.get(alias, 0) / all_reads if all_reads else None,
        }
        if alias == conf.PRIMARY:
            # Of its reads, those meant for a replica that none could serve.
            row["fallbacks"] = fallbacks
        else:
            found = monitor(alias)
            row.update(available=found.is_available(), lag=found.lag, error=found.error or None)
        rows.append(row)
    return rows


def replica_gauges(snapshot: HostSnapshot) -> list[str]:
    """Return Prometheus lines for each replica's lag and availability."""
    rows = [row for row in replica_rows(snapshot) if row["role"] == "replica"]
    if not rows:
        return []
    lines = [
        "# HELP django_scale_replica_lag_seconds Replication lag at the last probe of this process.",
        "# TYPE django_scale_replica_lag_seconds gauge",
    ]
    for row in rows:
        lag = row["lag"]
        lines.append(
            f'django_scale_replica_lag_seconds{{alias="{row["alias"]}"}} {lag if lag is not None else "NaN"}'
        )
    lines += [
        "# HELP django_scale_replica_available Whether the replica takes reads (1) or not (0).",
        "# TYPE django_scale_replica_available gauge",
    ]
    lines += [
        f'django_scale_replica_available{{alias="{row["alias"]}"}} {int(row["available"])}' for row in rows
    ]
    return lines


def _events(snapshot: HostSnapshot, prefix: str) -> dict[str, int]:
    found = {}
    for name, value in snapshot.counters.items():
        kind, labels = split_name(name)
        if kind == "counter" and labels and labels[0].startswith(prefix):
            found[labels[0]] = value
    return dict(sorted(found.items()))


def status_document(snapshot: HostSnapshot, window: int = 5, replicas: bool = True) -> dict[str, Any]:
    """Return everything ``scale_status --json`` prints."""
    cache = _events(snapshot, "swr.")
    served = cache.get("swr.hit", 0) + cache.get("swr.stale", 0)
    lookups = served + cache.get("swr.miss", 0)
    return {
        "window": window,
        "routes": route_rows(snapshot, window),
        "replicas": replica_rows(snapshot) if replicas else [],
        "cache": {"hit_rate": served / lookups if lookups else None, "events": cache},
        "sniper": _events(snapshot, "sniper."),
        # Newest first, at most 50 (django_scale.metrics.kills).
        "kills": snapshot.kills,
        "slots": {"live": snapshot.live_slots, "used": snapshot.used_slots, "dropped": snapshot.dropped},
    }
