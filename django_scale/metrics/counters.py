"""Per-process counters and timings of django-scale's features.

Counters are plain numbers kept in this process (a web worker, a Celery worker); export them
with :func:`snapshot` to whatever collects your metrics. Names are dotted, by feature:

``swr.hit``
    a fresh value served from the cache
``swr.stale``
    a stale value served while a refill runs
``swr.miss``
    no usable value: the caller computed (or waited for another caller's computation)
``swr.wait``
    a cold-miss caller that waited for another caller's computation
``swr.refill.enqueued`` / ``swr.refill.suppressed``
    refills sent to Celery / stale serves that found a refill already claimed
``swr.refill.inline``
    refills computed in the request, because the broker was down or by option
``swr.refill.succeeded`` / ``swr.refill.failed`` / ``swr.refill.discarded``
    refills that wrote, raised, or were dropped because the key was invalidated meanwhile
``swr.stale_if_error``
    a value past ``stale`` served because recomputing it raised
``swr.cache_down`` / ``swr.broker_down``
    operations that found the cache or the Celery broker unreachable
``replicas.cache_down``
    outages of the cache where the replica monitors share their state (it failed, or did not
    answer within its short timeout): each process then goes by its own view of the replicas
``sniper.cancel`` / ``sniper.terminate`` / ``sniper.dry_run``
    backends the query sniper cancelled, terminated, or would have (``SNIPER_DRY_RUN``)
``sniper.missed`` / ``sniper.over_budget`` / ``sniper.lock_busy``
    kills the sniper missed (the query had ended or moved on), left alone past its kill
    budget, and runs it skipped because another sniper held the lock

``counts.approx`` / ``counts.exact``
    counts :func:`~django_scale.counting.approx_count` answered with an estimate or exactly
``n_plus_one.reported``
    N+1 query patterns the detector reported

Timings (``observe``) keep a count, a sum and a maximum: ``swr.refill.seconds`` (how long a
refill computed) and ``swr.staleness`` (how many seconds past fresh a served value was).

Once :func:`django_scale.metrics.enable` has run in a process (``MetricsMiddleware`` runs it),
each increment is also added to the host's shared counters, and, inside a request, to the
request's route (both with the rest of the request, when it is recorded): see :doc:`/monitoring`.
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Timing", "add_routing_state", "close_request_events", "increment", "observe", "reset", "snapshot"]


@dataclass
class Timing:
    """Count, sum and maximum of the observed values of one timing."""

    #: How many values were observed.
    count: int = 0
    #: Their sum.
    total: float = 0.0
    #: The largest.
    maximum: float = 0.0

    @property
    def mean(self) -> float:
        """The mean observed value (``0.0`` before any)."""
        return self.total / self.count if self.count else 0.0


_lock = threading.Lock()
_counters: Counter[str] = Counter()
_timings: dict[str, Timing] = {}


#: The request being recorded, when request metrics are on (else ``None``): a list whose item 0
#: is its counters, ``name -> amount`` (``0`` until its first increment, ``None`` once its
#: recording has read them), and whose other items are
#: :mod:`~django_scale.metrics.recording`'s. While a request's counters are open,
#: :func:`increment` adds to them only: the recording adds them to the host's shared counters
#: with the rest of the request, in one write. An increment from something the request
#: started that outlives it goes to the shared counters at once, as outside a request.
recorded_request: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "django_scale_recorded_request", default=None
)
#: Where increments also go once shared metrics are enabled in this process, else ``None``.
_shared_sink: list[Callable[[str, int], None]] = []


def increment(name: str, amount: int = 1) -> None:
    """Add *amount* to counter *name*."""
    current = recorded_request.get()
    with _lock:
        _counters[name] += amount
        # Under the lock that the recording takes to close the request's counters
        # (close_request_events()): an increment from a thread the request started lands
        # either in them before they are read, or in the host's counters after; never lost.
        events: dict[str, int] | int | None = None if current is None else current[0]
        if events is not None:
            if not isinstance(events, dict):  # 0: the request's first increment
                events = {}
                current[0] = events  # type: ignore[index]
            events[name] = events.get(name, 0) + amount
            return
    if _shared_sink:
        _shared_sink[0](name, amount)


def add_routing_state(state: Any) -> None:
    """Hand the request being recorded a routing state that ``ScaleMiddleware`` opened for it.

    ``MetricsMiddleware`` comes before ``ScaleMiddleware`` (so that its latency covers the
    wait for a replica and the write position read after a write): by the time it records,
    the routing state's context variable is reset. Each run of the request (a second one
    after a replica failed) hands its own.
    """
    current = recorded_request.get()
    if current is not None:
        states = current[1]
        if states is None:
            current[1] = [state]
        else:
            states.append(state)


def close_request_events(current: list[Any]) -> dict[str, int] | None:
    """Return the counters of the request *current* (``recorded_request``'s value) and close them:
    later increments of anything the request started go to the host's counters at once."""
    # acquire()/release(), not "with": once per recorded request, and a third of the cost.
    _lock.acquire()
    try:
        events: dict[str, int] | int | None = current[0]
        current[0] = None
    finally:
        _lock.release()
    return events or None  # type: ignore[return-value]


def observe(name: str, value: float) -> None:
    """Record one *value* (seconds) of timing *name*."""
    with _lock:
        timing = _timings.setdefault(name, Timing())
        timing.count += 1
        timing.total += value
        timing.maximum = max(timing.maximum, value)


def snapshot() -> dict[str, int | Timing]:
    """Return a copy of every counter and timing of this process."""
    with _lock:
        copy: dict[str, int | Timing] = dict(_counters)
        copy.update({name: Timing(t.count, t.total, t.maximum) for name, t in _timings.items()})
        return copy


def reset() -> None:
    """Set every counter and timing back to zero (for tests and benchmarks)."""
    with _lock:
        _counters.clear()
        _timings.clear()
