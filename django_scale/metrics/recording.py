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
"""

from __future__ import annotations

import contextvars
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
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
from django_scale.metrics.sketch import bucket_of
from django_scale.metrics.store import SlotStore

__all__ = ["MetricsMiddleware", "SEP", "UNRESOLVED", "enable", "get_store", "route_of"]

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
                store = _stores[key] = SlotStore(*key)
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
        _current_store[0] = None


def _shared_increment(name: str, amount: int) -> None:
    # Outside a recorded request (inside one, _record adds the request's events to the host's
    # counters with the rest of the request, in one write).
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

    It adds to the recorded request's figures of the alias, at the alias's place (see
    ``_places``), kept in the closure: Django calls an execute wrapper through
    ``functools.partial(wrapper, executor)`` per query, and a closure's call costs less there
    than a bound method's, a partial's or a function's with one more argument (callgrind).
    """
    place = _place_of(alias)
    seconds = place + 1

    def timed_execute(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        current = _get_request()
        if current is None:
            return execute(sql, params, many, context)
        try:
            current[place] += 1
        except IndexError:  # an alias given its place after the request began
            current.extend(_blank[len(current) :])
            current[place] += 1
        start = _perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            current[seconds] += _perf_counter() - start

    _timers.add(timed_execute)
    return timed_execute


#: The wrappers query_timer() made (so that disable() finds them among a connection's).
_timers: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def is_query_timer(wrapper: object) -> bool:
    """Return whether the execute wrapper *wrapper* is one :func:`query_timer` made."""
    return wrapper in _timers


_perf_counter = time.perf_counter

#: A recorded request's figures: ``[events, states, queries, seconds, queries, seconds, ...]``,
#: one pair per database alias at the alias's place in :data:`_places` (even, from 2); item 0
#: is :data:`~django_scale.metrics.counters.recorded_request`'s, item 1 the routing states
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
                _aliases = [*_aliases, alias, None]
                _blank = [*_blank, 0, 0.0]
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
    match = getattr(request, "resolver_match", None)
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


def _record(request: HttpRequest, status: int, elapsed: float, now: float, current: list[Any]) -> None:
    """Record a request that ended at *now* after *elapsed* seconds, with its events and DB figures.

    The hot path of every recorded request: the host's store is taken from where
    :func:`get_store` keeps it, without the call (a Python call costs about as much as a
    write to the store).
    """
    events = counters.close_request_events(current)
    route = route_of(request)
    by_route = _names.get(request.method)  # type: ignore[arg-type]
    names = by_route.get(route) if by_route is not None else None
    if names is None:
        names = _names_of(request.method, route)
    timings = [(names.request, bucket_of(elapsed), elapsed)]
    tallies = [names.statuses.get(status) or names.status(status)]
    header = request.META.get("HTTP_X_REQUEST_START")
    if header:
        queued = queue_seconds(header, now - elapsed)
        if queued is not None:
            timings.append((names.queue, bucket_of(queued), queued))
    # Each alias the request queried: its DB time and query count (current: see _places).
    aliases = _aliases
    for place in range(2, len(current), 2):
        queries = current[place]
        if queries:
            alias = aliases[place]
            db_name, queries_name = names.aliases.get(alias) or names.alias(alias)  # type: ignore[arg-type]
            seconds = current[place + 1]
            timings.append((db_name, bucket_of(seconds), seconds))
            tallies.append((queries_name, queries))
    states = current[1]
    if states is None:
        # MetricsMiddleware inside ScaleMiddleware (the order W510 warns of): its state is current.
        state = _state_var[0].get() if _state_var else _routing_state()
        states = () if state is None else (state,)
    for state in states:
        for alias, reads in state.reads.items():
            tallies.append((names.read(alias), reads))
        if state.fallbacks:
            # Of the primary's reads, those only there because no replica could serve them.
            tallies.append((names.fallbacks, state.fallbacks))
        if state.replica_failed:
            tallies.append((names.event("replicas.read_failed")[0], 1))
        if state.pinned:
            # Reads sent to the primary for the rest of the request (after a write, a replica
            # that had not replayed the user's write, ...): the reason is in the logs, not here.
            tallies.append((names.event("routing.pinned")[0], 1))
    if events:
        # The request's increments: on its route, and (once enabled) in the host's counters,
        # where an increment outside a request goes at once (counters.increment).
        shared = bool(counters._shared_sink)
        for name, amount in list(events.items()):
            route_name, host_name = names.event(name)
            tallies.append((route_name, amount))
            if shared:
                tallies.append((host_name, amount))
    (_current_store[0] or get_store()).record(timings, tallies, now)


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
            elapsed = _perf_counter() - start
            _reset_request(token)
            _record(request, status, elapsed, _time(), current)
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
            elapsed = _perf_counter() - start
            _reset_request(token)
            _record(request, status, elapsed, _time(), current)
        return response


_time = time.time
