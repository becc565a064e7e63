"""The slow-query log: statements over ``SLOW_QUERY_MS``, fingerprinted, merged across workers.

Opt in with :class:`SlowQueryMiddleware` in ``MIDDLEWARE`` (it names each request's route and
installs the wrapper) or :func:`install`. Read the log with :func:`slow_queries`.

The log keeps each statement's slowest run **with its real parameters**, which may be personal
data (an e-mail address searched for, a user's id): expose it to staff only, and set
``SLOW_QUERY_REDACT`` to keep no parameters at all.
"""

from __future__ import annotations

from django_scale.slowlog.fingerprint import digest, fingerprint
from django_scale.slowlog.recorder import (
    SlowQueryMiddleware,
    SlowQueryWrapper,
    current_route,
    install,
    recording,
    uninstall,
)
from django_scale.slowlog.records import SlowQuery
from django_scale.slowlog.store import flush
from django_scale.slowlog.store import reset as _reset_store

__all__ = [
    "SlowQuery",
    "SlowQueryMiddleware",
    "SlowQueryWrapper",
    "current_route",
    "digest",
    "fingerprint",
    "flush",
    "install",
    "recording",
    "reset",
    "slow_queries",
    "uninstall",
]


def slow_queries(*, limit: int | None = None) -> list[SlowQuery]:
    """Return the logged statements of every worker, the most total time first.

    It merges this process's records into the cache first, so that they are included.
    """
    from django_scale.slowlog import store

    store.flush()
    table = store.merged()
    records = [
        SlowQuery(
            fingerprint=entry.fingerprint,
            digest=key,
            alias=entry.alias,
            count=entry.count,
            total_ms=entry.total_ms,
            mean_ms=entry.total_ms / entry.count if entry.count else 0.0,
            p99_ms=entry.quantile(0.99),
            max_ms=entry.max_ms,
            routes=dict(sorted(entry.routes.items(), key=lambda item: -item[1])),
            example_sql=entry.example_sql,
            example_params=entry.example_params,
        )
        for key, entry in table.items()
    ]
    records.sort(key=lambda record: record.total_ms, reverse=True)
    return records[:limit] if limit is not None else records


def reset(*, cache: bool = True) -> None:
    """Forget the log: this process's records and, if *cache*, the shared table."""
    _reset_store(cache=cache)
