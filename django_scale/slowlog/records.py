"""The slow-query log's records: one per fingerprint, mergeable across processes.

Durations go into log-spaced buckets (each 2 % wider than the one before), so that the p99 of
merged records is the p99 of all their durations within 2 %, and a record's size is bounded by
the range of its durations, not their number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Entry", "SlowQuery"]

#: Relative width of a duration bucket.
GAMMA = 1.02
_LOG_GAMMA = math.log(GAMMA)
#: How many routes each record names (those that ran it most).
MAX_ROUTES = 10
#: Values of an example's parameters longer than this are cut (a slow COPY has big ones).
MAX_PARAMETER_LENGTH = 200


def bucket(ms: float) -> int:
    """Return the bucket of a duration of *ms* milliseconds."""
    return math.ceil(math.log(max(ms, 1e-3)) / _LOG_GAMMA)


def bucket_value(index: int) -> float:
    """Return the duration (milliseconds) a bucket stands for: the middle of its range."""
    return 2 * GAMMA**index / (GAMMA + 1)


def jsonable(value: Any) -> Any:
    """Return *value* as what JSON (and the cache) keeps: numbers, strings, ``None``, lists."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (bytes, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return text if len(text) <= MAX_PARAMETER_LENGTH else text[:MAX_PARAMETER_LENGTH] + "…"


@dataclass
class Entry:
    """The running totals of one fingerprint (in one process, or merged)."""

    fingerprint: str
    alias: str
    count: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)
    #: The slowest run's statement and parameters (``None`` when redacted).
    example_sql: str = ""
    example_params: Any = None
    example_ms: float = 0.0

    def add(self, ms: float, route: str, sql: str, params: Any) -> None:
        """Count one run of *ms* milliseconds by *route*; keep it as the example if the slowest."""
        self.count += 1
        self.total_ms += ms
        index = bucket(ms)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.routes[route] = self.routes.get(route, 0) + 1
        if len(self.routes) > MAX_ROUTES:
            del self.routes[min(self.routes, key=self.routes.__getitem__)]
        if ms >= self.max_ms:
            self.max_ms = ms
            # The statement and its own parameters together, never one run's SQL with
            # another's values.
            self.example_sql, self.example_params, self.example_ms = sql, params, ms

    def merge(self, other: Entry) -> None:
        """Add *other*'s runs to this entry's."""
        self.count += other.count
        self.total_ms += other.total_ms
        for index, count in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + count
        for route, count in other.routes.items():
            self.routes[route] = self.routes.get(route, 0) + count
        while len(self.routes) > MAX_ROUTES:
            del self.routes[min(self.routes, key=self.routes.__getitem__)]
        if other.max_ms >= self.max_ms:
            self.max_ms = other.max_ms
            self.example_sql, self.example_params, self.example_ms = (
                other.example_sql,
                other.example_params,
                other.example_ms,
            )

    def quantile(self, q: float) -> float:
        """Return the *q* quantile of the durations (milliseconds), within 2 %."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))  # nearest rank
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(bucket_value(index), self.max_ms)
        return self.max_ms

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as JSON-able values (how the cache keeps it)."""
        return {
            "f": self.fingerprint,
            "a": self.alias,
            "n": self.count,
            "t": self.total_ms,
            "m": self.max_ms,
            "b": [[index, count] for index, count in self.buckets.items()],
            "r": self.routes,
            "s": self.example_sql,
            "p": self.example_params,
            "e": self.example_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Entry:
        """Return the entry :meth:`to_dict` returned."""
        return cls(
            fingerprint=str(data["f"]),
            alias=str(data["a"]),
            count=int(data["n"]),
            total_ms=float(data["t"]),
            max_ms=float(data["m"]),
            buckets={int(index): int(count) for index, count in data["b"]},
            routes={str(route): int(count) for route, count in data["r"].items()},
            example_sql=str(data["s"]),
            example_params=data["p"],
            example_ms=float(data["e"]),
        )


@dataclass(frozen=True)
class SlowQuery:
    """One statement of the slow-query log, as :func:`django_scale.slowlog.slow_queries` returns it."""

    #: The statement with literals and placeholders as ``?``, IN-lists as ``(...)``.
    fingerprint: str
    #: A short, stable name of the fingerprint.
    digest: str
    #: The database alias that ran it (the first that did).
    alias: str
    #: How many runs were over the threshold.
    count: int
    #: Their total time, in milliseconds.
    total_ms: float
    #: Their mean time, in milliseconds.
    mean_ms: float
    #: Their 99th percentile, in milliseconds (within 2 %).
    p99_ms: float
    #: The slowest run, in milliseconds.
    max_ms: float
    #: Route names (``request.resolver_match.view_name``) and how many runs each made.
    routes: dict[str, int]
    #: The slowest run's statement, with ``%s`` placeholders.
    example_sql: str
    #: Its parameters, or ``None`` when ``SLOW_QUERY_REDACT`` is on.
    example_params: list[Any] | dict[str, Any] | None
