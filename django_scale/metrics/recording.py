"""Recording per request: :class:`MetricsMiddleware`, and the host's store it writes to.

Recording is opt-in and costs nothing when off: nothing here runs unless
``MetricsMiddleware`` is in ``MIDDLEWARE`` (or :func:`enable` was called). When it is, each
request records, keyed by its resolver route (never the raw path) and method:

* its latency, and the queue time a proxy's ``X-Request-Start`` header tells;
* per database alias, its DB time and query count (through an execute wrapper that the
  middleware installs on each connection as it is created, and that does nothing outside a
  recorded request);
* its status class, the reads routing sent to each alias, the reads that fell back to the
  primary because no replica could serve them, and every
  :func:`django_scale.metrics.increment` made while it ran (cache hits, stale serves, refills,
  approximate counts, N+1 reports).

A request's end keeps these; they are written to the store in batches
(:mod:`~django_scale.metrics.pending`, ``METRICS_BATCH``), at most a second apart.
"""

from __future__ import annotations

import contextvars
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from itertools import compress, groupby, repeat
from operator import itemgetter, sub
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.signals import setting_changed
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponseBase

from django_scale.conf import conf
from django_scale.metrics import counters
from django_scale.metrics.pending import Pending
from django_scale.metrics.sketch import Sketch
from django_scale.metrics.store import SlotStore

__all__ = ["MetricsMiddleware", "SEP", "UNRESOLVED", "enable", "flush", "get_store", "route_of"]

#: Separates the labels of a series name: ``"request\x1fnews:article\x1fGET"``.
SEP = "\x1f"
#: The one series of every request no URL pattern matched (404s): a flood of random paths
#: adds no series.
UNRESOLVED = "<unresolved>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_stores: dict[tuple[str, int, int, int], SlotStore] = {}
_stores_lock = threading.Lock()


#: The recorded request (``None`` outside one): ``[events, db, states]``, its events (``name ->
#: amount``, what :func:`~django_scale.metrics.increment` adds to; ``None`` once recorded), its DB
#: figures (per alias, ``[queries, seconds]``) and the routing states ``ScaleMiddleware`` handed
#: it (:func:`~django_scale.metrics.counters.add_routing_state`). One list in one context variable: setting
#: and resetting a context variable is one of the dearest steps of a request's recording.
_request = counters.recorded_request
_set_request = _request.set
_reset_request = _request.reset
_get_request = _request.get


def get_store() -> SlotStore:
    """Return this host's store for the current ``METRICS_*`` settings (one per file per process).

    A process maps each file once: POSIX record locks belong to the process, so a second
    mapping of the same file would not see the first one's slot as taken. The store is kept
    until ``DJANGO_SCALE`` changes (Django's ``setting_changed`` signal, which
    ``override_settings`` sends): no settings lookup per request.
    """
    store = _current_store[0]
    if store is not None:
        return store
    raw = getattr(settings, "DJANGO_SCALE", None)
    last = _last_store[0]
    if last[0] is raw and last[1] is not None:
        _current_store[0] = last[1]
        return last[1]
    key = conf.metrics_options()
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = SlotStore(*key)
                # A read in this process first writes the requests waiting in their batch.
                store.before_read = flush
                _stores[key] = store
    _pending.size = conf.METRICS_BATCH
    # Once per DJANGO_SCALE object, as conf's hot paths: override_settings installs a new one.
    _last_store[0] = (raw, store)
    _current_store[0] = store
    return store


#: (the DJANGO_SCALE object, its store): one tuple, replaced whole, so threads never mix two.
_last_store: list[tuple[object, SlotStore | None]] = [(object(), None)]
#: The store get_store() returns until DJANGO_SCALE changes.
_current_store: list[SlotStore | None] = [None]


@receiver(setting_changed)
def _settings_changed(setting: str, **kwargs: Any) -> None:
    if setting == "DJANGO_SCALE":
        # The requests that ran under the settings that end go to their store, not the next one.
        _pending.write_due()
        _current_store[0] = None
        # The next request's end writes at once, through get_store(): METRICS_BATCH read again.
        _pending.limit = 0


def _shared_increment(name: str, amount: int) -> None:
    # Outside a recorded request (inside one, the request's events go to the host's counters
    # with the rest of the request, in its batch's write).
    get_store().record((), ((f"counter{SEP}{name}", amount),))


def enable() -> SlotStore:
    """Send this process's :func:`~django_scale.metrics.increment` calls to the host's store too.

    ``MetricsMiddleware`` calls it; call it in processes without the middleware whose
    counters should be shared (a Celery worker's ``worker_process_init``, a sniper).
    """
    store = get_store()
    counters._shared_sink[:] = [_shared_increment]
    return store


def disable() -> None:
    """Undo what ``MetricsMiddleware`` set up in this process (for tests and benchmarks).

    Stop sharing increments, stop wrapping new connections, and take the timing wrapper off
    this thread's open connections.
    """
    counters._shared_sink.clear()
    connection_created.disconnect(dispatch_uid="django_scale.metrics")
    for connection in connections.all(initialized_only=True):
        if getattr(connection, "_django_scale_metrics", False):
            wrappers = connection.execute_wrappers
            wrappers[:] = [wrapper for wrapper in wrappers if not is_query_timer(wrapper)]
            connection._django_scale_metrics = False  # type: ignore[attr-defined]


def query_timer(alias: str) -> Callable[..., Any]:
    """Return an execute wrapper that counts and times each query of a connection to *alias*.

    It adds to the recorded request's figure of the alias, at the alias's place (see
    ``_places``), kept in the closure: Django calls an execute wrapper through
    ``functools.partial(wrapper, executor)`` per query, and a closure's call costs less there
    than a bound method's, a partial's or a function's with one more argument (callgrind).
    The figure is one float, :data:`QUERY` per query plus its seconds: one addition per query
    counts it and times it.
    """
    place = _place_of(alias)

    def timed_execute(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        current = _get_request()
        if current is None:
            return execute(sql, params, many, context)
        start = _perf_counter() - QUERY
        try:
            return execute(sql, params, many, context)
        finally:
            try:
                current[place] += _perf_counter() - start
            except IndexError:  # an alias given its place after the request began
                current.extend(_blank[len(current) :])
                current[place] += _perf_counter() - start

    _timers.add(timed_execute)
    return timed_execute


#: The wrappers query_timer() made (so that disable() finds them among a connection's).
_timers: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def is_query_timer(wrapper: object) -> bool:
    """Return whether the execute wrapper *wrapper* is one :func:`query_timer` made."""
    return wrapper in _timers


_perf_counter = time.perf_counter

#: What a query adds to its alias's figure besides its seconds: the figure divided by it is
#: the request's queries on the alias, the remainder their seconds (so below 18 hours of one
#: request's DB time on one alias). A float: ``n * QUERY`` is exact, the seconds beside it keep
#: a precision under a microsecond per query up to about 60,000 queries, and the sum of n
#: additions of at least QUERY each is never below ``n * QUERY``: the division never miscounts.
QUERY = 65536.0

#: A recorded request's figures: ``[events, states, figure, figure, ...]``, one figure per
#: database alias (:data:`QUERY` per query plus its seconds) at the alias's place in
#: :data:`_places` (from 2); item 0 is
#: :data:`~django_scale.metrics.counters.recorded_request`'s, item 1 the routing states
#: ``ScaleMiddleware`` handed it (``None`` before any: see
#: :func:`~django_scale.metrics.counters.add_routing_state`). A request starts with a copy of
#: ``_blank``; ``_aliases[place]`` is the alias at *place*.
_places: dict[str, int] = {}
_blank: list[Any] = [0, None]
_aliases: list[str | None] = [None, None]
_places_lock = threading.Lock()


def _place_of(alias: str) -> int:
    """Return *alias*'s place in a recorded request's figures, giving it one the first time."""
    place = _places.get(alias)
    if place is None:
        with _places_lock:
            place = _places.get(alias)
            if place is None:
                global _blank, _aliases
                place = len(_blank)
                # New lists, not extended ones (a request's list is a copy of one), the alias
                # first: a list with a place for it finds it.
                _aliases = [*_aliases, alias]
                _blank = [*_blank, 0.0]
                _places[alias] = place
    return place


def _wrap_connection(
    sender: Any = None, connection: BaseDatabaseWrapper | None = None, **kwargs: Any
) -> None:
    """Install the timing wrapper on *connection* once, as its outermost execute wrapper.

    ``execute_wrappers`` is the list :meth:`~django.db.backends.base.base.BaseDatabaseWrapper.execute_wrapper`
    appends to and pops from (django/db/backends/base/base.py, Django 4.2 to 6.1). The
    wrapper goes first in it, so that a ``with connection.execute_wrapper(...)`` block open
    when the connection is made still pops its own wrapper; tests/test_metrics.py pins this.
    """
    if connection is None or getattr(connection, "_django_scale_metrics", False):
        return
    connection.execute_wrappers.insert(0, query_timer(connection.alias))
    connection._django_scale_metrics = True  # type: ignore[attr-defined]


def route_of(request: HttpRequest) -> str:
    """Return the series name of *request*'s route: its URL name, else its pattern, never its path."""
    return _route(getattr(request, "resolver_match", None))


def _route(match: Any) -> str:
    """Return the series name of the route of a request's ``ResolverMatch`` (``None``: unresolved)."""
    if match is None:
        return UNRESOLVED
    if match.url_name:
        return match.view_name  # type: ignore[no-any-return]
    return "/" + match.route  # type: ignore[no-any-return]


def queue_seconds(header: str | None, now: float) -> float | None:
    """Return the seconds since a proxy's ``X-Request-Start`` (``t=`` seconds, ms or µs)."""
    if not header:
        return None
    try:
        stamp = float(header.strip().removeprefix("t="))
    except ValueError:
        return None
    if stamp > 1e14:
        stamp /= 1e6
    elif stamp > 1e11:
        stamp /= 1e3
    waited = now - stamp
    # A clock a little behind the proxy's gives a small negative wait: none. Beyond an hour
    # the header is not a request start.
    return max(waited, 0.0) if -1.0 < waited < 3600.0 else None


def _routing_state() -> Any:
    """Return the request's routing state (:func:`django_scale.replicas.current_state`), if any."""
    if not _state_var:
        # django_scale.replicas imports this package (its counters): import it at first use.
        # The context variable itself, not current_state(): one call less per request.
        from django_scale.replicas.state import _state

        _state_var.append(_state)
    return _state_var[0].get()


_state_var: list[contextvars.ContextVar[Any]] = []


class _Names:
    """The series names of one route and method, made once (a few f-strings less per request)."""

    __slots__ = ("labels", "request", "queue", "fallbacks", "statuses", "aliases", "reads", "events")

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.request = f"request{SEP}{labels}"
        self.queue = f"queue{SEP}{labels}"
        self.fallbacks = f"fallbacks{SEP}{labels}"
        # By status code (a few dozen at most), each to its class's series, with one request.
        self.statuses: dict[int, tuple[str, int]] = {}
        self.aliases: dict[str, tuple[str, str]] = {}
        self.reads: dict[str, str] = {}
        self.events: dict[str, tuple[str, str]] = {}

    def status(self, status: int) -> tuple[str, int]:
        tally = self.statuses[status] = (f"requests{SEP}{self.labels}{SEP}{status // 100}xx", 1)
        return tally

    def alias(self, alias: str) -> tuple[str, str]:
        names = self.aliases[alias] = (
            f"db{SEP}{self.labels}{SEP}{alias}",
            f"queries{SEP}{self.labels}{SEP}{alias}",
        )
        return names

    def read(self, alias: str) -> str:
        name = self.reads.get(alias)
        if name is None:
            name = self.reads[alias] = f"reads{SEP}{self.labels}{SEP}{alias}"
        return name

    def event(self, event: str) -> tuple[str, str]:
        """The route's series of *event*, and the host's."""
        names = self.events.get(event)
        if names is None:
            names = self.events[event] = (f"event{SEP}{self.labels}{SEP}{event}", f"counter{SEP}{event}")
        return names


#: Per method, per route: its names (two lookups of strings cost less than one of a new
#: tuple). Bounded: methods are the seven of _METHODS and OTHER, routes the URL patterns' (and
#: one for 404s).
_names: dict[str, dict[str, _Names]] = {}


def _names_of(method: str | None, route: str) -> _Names:
    """Return the names of *route* and *method*, made the first time (methods past _METHODS: OTHER)."""
    if method not in _METHODS:
        method = "OTHER"
    by_route = _names.setdefault(method, {})
    names = by_route.get(route)
    if names is None:
        names = by_route.setdefault(route, _Names(f"{route}{SEP}{method}"))
    return names


#: One ended request, as :class:`~django_scale.metrics.pending.Pending` keeps it until it is
#: written: its ``ResolverMatch`` (``None``: unresolved), method, ``X-Request-Start`` header,
#: status, start and end (``time.perf_counter()``), figures (see :data:`_places`) and events.
Entry = tuple[Any, "str | None", "str | None", int, float, float, list[Any], "dict[str, int] | None"]


def _end(request: HttpRequest, status: int, start: float, current: list[Any]) -> None:
    """End a recorded request: close its events, keep what its recording needs, write the batch when due.

    The request's events close now (under the lock :func:`~django_scale.metrics.increment`
    takes): an increment from something the request started that outlives it goes to the
    host's counters, not to the request. The rest waits in :data:`_pending` (see
    :mod:`~django_scale.metrics.pending`): one request's recording at its end is a few dozen
    bytecode steps, the batch's a fraction of a request's each, run while warm.
    """
    end = _perf_counter()
    events = _close_events(current)
    if current[1] is None:
        # MetricsMiddleware inside ScaleMiddleware (the order W510 warns of), or no
        # ScaleMiddleware: the routing state, if any, is current until the request ends.
        state = _state_var[0].get() if _state_var else _routing_state()
        if state is not None:
            current[1] = (state,)
    _entries_append(
        (
            request.resolver_match,
            request.method,
            request.META.get("HTTP_X_REQUEST_START"),
            status,
            start,
            end,
            current,
            events,
        )
    )
    if len(_entries) >= _pending.limit:
        _pending.write_due()


def _write(entries: list[Entry]) -> None:
    """Write ended requests to the host's store: one ``add()`` per minute they ended in.

    The store is taken from where :func:`get_store` keeps it, without the call.
    """
    store = _current_store[0] or get_store()
    # Requests end on the monotonic clock: their wall-clock time is that plus the clocks' offset now.
    offset = time.time() - _perf_counter()
    if (entries[0][5] + offset) // 60 == (entries[-1][5] + offset) // 60:
        _write_minute(store, entries, offset)
        return
    for _, in_minute in groupby(entries, key=lambda entry: (entry[5] + offset) // 60):
        _write_minute(store, list(in_minute), offset)


def _write_minute(store: SlotStore, entries: list[Entry], offset: float) -> None:
    """Write ended requests of one minute as one ``add()``, summed by route and method first.

    Per request only its route is found; everything else is counted per route with
    ``map()``, ``sum()``, ``Counter()`` and :meth:`Sketch.of` over the batch (C loops, no
    bytecode per request).
    """
    keys = list(zip(map(_route, map(_match, entries)), map(_method, entries), strict=True))
    by_route: dict[tuple[str, str | None], list[Entry]]
    if keys.count(keys[0]) == len(keys):
        by_route = {keys[0]: entries}
    else:
        by_route = {}
        for key, entry in zip(keys, entries, strict=True):
            by_route.setdefault(key, []).append(entry)
    timings: list[tuple[str, Sketch]] = []
    tallies: Counter[str] = Counter()
    shared = bool(counters._shared_sink)
    aliases = _aliases
    for (route, method), group in by_route.items():
        names = _names_of(method, route)
        timings.append((names.request, Sketch.of(map(sub, map(_end_of, group), map(_start, group)))))
        for status, requests in Counter(map(_status, group)).items():
            tallies[(names.statuses.get(status) or names.status(status))[0]] += requests
        with_header = compress(group, map(_header, group))
        waits = [
            wait for entry in with_header if (wait := queue_seconds(entry[2], entry[4] + offset)) is not None
        ]
        if waits:
            timings.append((names.queue, Sketch.of(waits)))
        # Each alias the requests queried: per request its DB time, and the queries summed.
        figures = list(map(_figures, group))
        width = len(aliases)
        if min(map(len, figures)) < width:  # a request that began before an alias had its place
            for figure in figures:
                figure.extend(repeat(0.0, width - len(figure)))
        for place in range(2, width):
            queried = list(filter(None, map(itemgetter(place), figures)))
            if queried:
                db_name, queries_name = names.aliases.get(aliases[place]) or names.alias(aliases[place])  # type: ignore[arg-type]
                split = list(map(divmod, queried, repeat(QUERY)))  # (queries, seconds) per request
                timings.append((db_name, Sketch.of(map(_second, split))))
                tallies[queries_name] += int(sum(map(_first, split)))
        for states in filter(None, map(_states, figures)):
            for state in states:
                for alias, reads in state.reads.items():
                    tallies[names.read(alias)] += reads
                if state.fallbacks:
                    # Of the primary's reads, those only there because no replica could serve them.
                    tallies[names.fallbacks] += state.fallbacks
                if state.replica_failed:
                    tallies[names.event("replicas.read_failed")[0]] += 1
                if state.pinned:
                    # Reads sent to the primary for the rest of the request (after a write, a replica
                    # that had not replayed the user's write, ...): the reason is in the logs, not here.
                    tallies[names.event("routing.pinned")[0]] += 1
        for events in filter(None, map(_events, group)):
            # The request's increments: on its route, and (once enabled) in the host's counters,
            # where an increment outside a request goes at once (counters.increment).
            for event, amount in events.items():
                route_name, host_name = names.event(event)
                tallies[route_name] += amount
                if shared:
                    tallies[host_name] += amount
    store.add(timings, list(tallies.items()), entries[-1][5] + offset)


_match, _method, _header, _status, _start, _end_of, _figures, _events = map(itemgetter, range(8))
_states = _second = itemgetter(1)
_first = itemgetter(0)


def flush() -> int:
    """Write this process's ended requests that wait in their batch to the store; return how many.

    A read of the store in this process (:meth:`SlotStore.snapshot`, the export views,
    ``scale_status``) calls it first; call it before reading the file from elsewhere (for
    example before a test reads the store through a second ``SlotStore``).
    """
    return _pending.flush()


_pending = Pending(_write)
_entries = _pending.entries
_entries_append = _entries.append
_close_events = counters.close_request_events


class MetricsMiddleware:
    """Record each request's latency, DB time and events in the host's shared store.

    Place it first in ``MIDDLEWARE``, right before :class:`~django_scale.middleware.ScaleMiddleware`:
    its latency then covers all of that middleware's work (the wait for a replica that has the
    user's last write, the write position read after a write, a second run after a replica
    failed, recorded as one request), and it still sees the request's routing state, which
    ``ScaleMiddleware`` hands it. Sync and async.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        enable()
        for alias in connections:  # a place in each request's figures for every configured alias
            _place_of(alias)
        connection_created.connect(_wrap_connection, dispatch_uid="django_scale.metrics")
        for connection in connections.all(initialized_only=True):
            _wrap_connection(connection=connection)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        current = _blank.copy()
        token = _set_request(current)
        start = _perf_counter()
        status = 500
        try:
            response: HttpResponseBase = self.get_response(request)
            status = response.status_code
        finally:
            _reset_request(token)
            _end(request, status, start, current)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        current = _blank.copy()
        token = _set_request(current)
        start = _perf_counter()
        status = 500
        try:
            get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response
            response = await get_response(request)
            status = response.status_code
        finally:
            _reset_request(token)
            _end(request, status, start, current)
        return response
