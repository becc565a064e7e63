"""``ReplicaRouter``: writes to the primary, reads to a replica that has what the user wrote.

Add it to ``DATABASE_ROUTERS`` together with
:class:`~django_scale.middleware.ScaleMiddleware` in ``MIDDLEWARE``::

    DATABASE_ROUTERS = ["django_scale.routers.ReplicaRouter"]
    DJANGO_SCALE = {"REPLICAS": ["replica1", "replica2"]}
"""

from __future__ import annotations

import contextlib
import threading
import time
from asyncio import _get_running_loop
from typing import Any

from django.db import DatabaseError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model

from django_scale.conf import HotSettings, conf
from django_scale.replicas.fallback import fallback_window
from django_scale.replicas.guard import GUARD_ATTRIBUTE, guard_connection, install_guards, watchdog
from django_scale.replicas.monitors import ReplicaMonitor, monitor, route_generation
from django_scale.replicas.policy import order_replicas
from django_scale.replicas.state import RoutingState, _capture, _forced, _state, mark_write

__all__ = ["ReplicaRouter", "connections_changed"]

_monotonic = time.monotonic
_dict_get = dict.get


# -- The routing policy: which replica, and the cap on falling back to the primary ----------


def choose_replica(state: RoutingState, route: Route, now: float) -> str | None:
    """Return the replica *state*'s request may read from, or ``None`` for the primary (no I/O).

    The replica chosen first is kept while it stays available, so that a request's reads agree.
    """
    chosen = state.replica
    if chosen is not None:
        item = route[5][chosen]
        if state._version == item.version and now < state._valid_until:
            return chosen
        version = item.version
        available, until = item.availability(now, state.required_lsn, route[6])
        if available:
            state._version, state._valid_until = version, until
            return chosen
    # Each available replica, with how long its availability holds (the next decisions of the
    # request take the fast path above until then).
    candidates: dict[str, tuple[int, float]] = {}
    for alias, item in route[5].items():
        version = item.version
        available, until = item.availability(now, state.required_lsn, route[6])
        if available:
            candidates[alias] = (version, until)
    chosen = state.replica = pick_usable(list(candidates), route[4], route[5]) if candidates else None
    state._version, state._valid_until = candidates[chosen] if chosen else (-1, 0.0)
    return chosen


def free_read_alias(replicas: tuple[str, ...], chosen: str | None, primary: str, now: float) -> str:
    """Return where a free read goes, given the replica routing *chosen* (``None``: none)."""
    window = fallback_window
    window.count_read(now)
    if chosen is not None:
        return chosen
    cap = conf.PRIMARY_FALLBACK_CAP
    if window.may_fall_back(cap):
        return primary
    # Over the cap: a replica that answers but lags serves it, stale but without load on the primary.
    reachable = [
        alias for alias in replicas if not monitor(alias).is_unresponsive(now) and monitor(alias).checked_at
    ]
    alias = pick_usable(reachable)
    if alias is None:
        window.fallbacks += 1
        return primary
    window.capped += 1
    return alias


def pick_usable(
    aliases: list[str],
    handles: dict[str, BaseDatabaseWrapper] | None = None,
    monitors: dict[str, ReplicaMonitor] | None = None,
) -> str | None:
    """Return the first of *aliases*, in ``REPLICA_POLICY``'s order, whose connection opens, or ``None``.

    A replica's connection in this thread opens here, before the router hands out its alias,
    rather than in the middle of the caller's query: a refused connection takes the replica
    out of rotation and the read goes elsewhere instead of failing. An open connection is
    not tested again (that would cost a round trip per request), except by Django's own
    ``CONN_HEALTH_CHECKS`` check, which runs here then (:func:`_health_check`). *handles* are the aliases'
    connection objects and *monitors* their monitors, when the caller has them.
    """
    if len(aliases) > 1:
        aliases = order_replicas(aliases)
    for alias in aliases:
        connection = handles[alias] if handles is not None else connections[alias]
        item = monitors[alias] if monitors is not None else monitor(alias)
        # Never close a connection inside a transaction (the caller's atomic block, or the
        # primary's connection shared by share_primary_connection() in a TestCase): closing it
        # would break the transaction. A broken one fails its query: the guard raises
        # ReplicaReadError and ScaleMiddleware runs a safe request again on the primary.
        if connection.connection is not None and not connection.in_atomic_block:
            if connection.health_check_enabled and not connection.health_check_done:  # type: ignore[attr-defined]
                # CONN_HEALTH_CHECKS: checked now rather than in the caller's cursor().
                _health_check(alias, connection)
            mark = getattr(connection, "_django_scale_epoch", None)
            if connection.connection is not None and (
                connection.errors_occurred
                or (item.failures and mark != (id(connection.connection), item.failures))
            ):
                # Opened before the replica last failed (say, it restarted since), or a query
                # on it failed: it is likely broken, so open a new one rather than find out
                # in the middle of the caller's query.
                with contextlib.suppress(Exception):
                    connection.close()
        if connection.connection is None:
            try:
                connection.ensure_connection()
            except DatabaseError as exc:
                item.report_failure(exc)
                continue
            except AssertionError:
                # Django's test cases forbid aliases a test did not declare in `databases`
                # (DatabaseOperationForbidden is an AssertionError): read from the primary
                # there, without holding it against the replica.
                continue
        epoch = (id(connection.connection), item.failures)
        if getattr(connection, "_django_scale_epoch", None) != epoch:
            connection._django_scale_epoch = epoch  # type: ignore[attr-defined]
        # Guarded when it opened (connection_created), unless it opened inside an execute
        # wrapper block of the caller's or before the router existed: guard it now.
        if getattr(connection, GUARD_ATTRIBUTE, None) is None:
            guard_connection(connection)
        return alias
    return None


def _health_check(alias: str, connection: BaseDatabaseWrapper) -> None:
    """Run Django's ``CONN_HEALTH_CHECKS`` check of replica *connection* now, as the router hands it out.

    Django checks a persistent connection at the first query of each request, in
    ``cursor()``, and reconnects there when the check fails
    (``BaseDatabaseWrapper.close_if_health_check_failed()``, called by ``_cursor()``; the
    attributes ``health_check_enabled`` and ``health_check_done`` since Django 4.1, ticket
    #32948). On a replica that went down since, that reconnect fails outside any query, where
    no execute wrapper (the guard) sees it: the caller got a plain ``OperationalError``, and a
    GET a 500 instead of a second run; on a frozen replica the check's ``SELECT 1`` hung with
    no deadline. Checked here, a failed check closes the connection and :func:`pick_usable`
    opens a new one or skips the replica, and the ``SELECT 1`` is watched like a query. Django
    marks the check done, so ``cursor()`` does not check again. The health-check tests of
    ``tests/test_routing.py`` pin these names on every Django of the matrix (django-stubs does
    not declare the two attributes: hence the ``type: ignore`` where they are read).
    """
    ticket = watchdog.watch(alias, connection)
    try:
        connection.close_if_health_check_failed()
    except DatabaseError:
        # is_usable() catches the driver's errors; closing a broken connection may not.
        with contextlib.suppress(Exception):
            connection.close()
    finally:
        watchdog.unwatch(ticket)


def _in_atomic(primary: BaseDatabaseWrapper, replicas: tuple[BaseDatabaseWrapper, ...]) -> bool:
    """Whether reads must stay on the primary because a transaction is open (no I/O)."""
    if primary.in_atomic_block:
        # Django's TestCase wraps each test in atomic blocks of its own (marked _from_testcase,
        # Django 3.2+). They do not make the test's code transactional, but a replica on a
        # connection of its own cannot see the test's uncommitted rows (Django ticket #23718):
        # only a replica that shares the primary's connection may read there.
        if any(not getattr(block, "_from_testcase", False) for block in primary.atomic_blocks):
            return True
        return any(replica is not primary for replica in replicas)
    return any(replica.in_atomic_block for replica in replicas)


#: What a thread's decisions share: the primary's and the replicas' aliases, their
#: connection objects, the replicas' by alias, the replicas' monitors by alias, and the
#: settings they were read with.
Route = tuple[
    str,
    tuple[str, ...],
    BaseDatabaseWrapper,
    tuple[BaseDatabaseWrapper, ...],
    dict[str, BaseDatabaseWrapper],
    dict[str, ReplicaMonitor],
    HotSettings,
]


class Decision:
    """A thread's last first-read decision with one replica, which the thread's next request may take over.

    The replica's alias, monitor and connection object, the monitor's version then, until
    when the replica's availability held, and the open DB-API connection that was checked.
    (A class with slots rather than a tuple: the router reads its fields by name, in fewer
    steps than by index. A monitor bumps its version whenever its failures change, so the
    version covers them.)
    """

    __slots__ = (
        "alias",
        "monitor",
        "handle",
        "version",
        "until",
        "raw",
        "primary",
        "hot",
        "checked",
        "generation",
    )

    def __init__(
        self,
        alias: str,
        monitor: ReplicaMonitor,
        handle: BaseDatabaseWrapper,
        version: int,
        until: float,
        primary: BaseDatabaseWrapper,
        hot: HotSettings,
    ) -> None:
        self.alias = alias
        self.monitor = monitor
        self.handle = handle
        self.version = version
        self.until = until
        self.raw: Any = handle.connection
        #: Whether the connection has CONN_HEALTH_CHECKS: then only a request whose check is
        #: done may take the decision over (pick_usable() runs the check first).
        self.checked: bool = handle.health_check_enabled  # type: ignore[attr-defined]
        #: The primary's connection object in the thread, and the settings the route was read with.
        self.primary = primary
        self.hot = hot
        #: The route's generation (the thread's, when it looked the route up): read here, in a
        #: slot, rather than from the thread-local on every read.
        self.generation: int = _thread.generation


class _ThreadRoute(threading.local):
    """This thread's :data:`Route` and :data:`Decision` (a thread's connection objects are its own)."""

    route: Route | None = None
    generation = -1
    decision: Decision | None = None


_thread = _ThreadRoute()
#: Bumped by :func:`connections_changed`, by ``stop_monitors()`` and in a forked child (the
#: monitors are replaced then): every thread looks its route up again.
_generation = route_generation


def connections_changed() -> None:
    """Have the router look up the connection objects again, in every thread.

    The router looks up ``connections[alias]`` once per thread (each lookup of Django's costs
    more than the rest of a routing decision) and keeps the objects while the thread lives.
    Call this after replacing a connection object (``connections[alias] = other``) in a
    thread that has routed reads already, as
    :class:`~django_scale.testing.share_primary_connection` does. (Django replaces them only
    when its live server's threads start, before they serve anything.)
    """
    _generation[0] += 1  # (the list is monitors.route_generation)


def _route(hot: HotSettings) -> Route:
    """Look up the connection objects of the primary and the replicas (in this thread)."""
    by_alias = {}
    monitors = {}
    for alias in hot.replicas:
        by_alias[alias] = connections[alias]
        monitors[alias] = monitor(alias)
    route = (
        hot.primary,
        hot.replicas,
        connections[hot.primary],
        tuple(by_alias.values()),
        by_alias,
        monitors,
        hot,
    )
    if _get_running_loop() is None:
        # In a thread without an event loop (where the ORM runs), a connection object belongs
        # to the thread: it serves the thread's next requests too. (Under a running loop,
        # asgiref keeps connection objects per context instead: nothing is kept.)
        cached = _thread
        cached.route, cached.generation, cached.decision = route, _generation[0], None
    return route


def _holds(decision: Decision, now: float, required: int | None) -> bool:
    """Whether the thread's last *decision* holds for a read now that needs position *required*.

    It holds while the replica's monitor learnt nothing new (its version as it was; a failure
    bumps it), the time the replica's availability held has not passed, the replica has
    replayed *required*, and its connection is the one checked then (the same DB-API
    connection, no error on it since). A request's first read then takes it over without
    asking the monitor or the connection again.
    """
    handle = decision.handle
    return (
        decision.version == decision.monitor.version
        and now < decision.until
        and handle.connection is decision.raw
        and not handle.errors_occurred
        and (not decision.checked or handle.health_check_done)  # type: ignore[attr-defined]
        and (required is None or decision.monitor.replay_lsn >= required)
    )


def _remember(route: Route, chosen: str, version: int, until: float) -> None:
    """Keep *chosen*, just found available and usable, as the thread's last decision.

    Only with one replica (with several, ``REPLICA_POLICY`` orders them anew for each request),
    only for the thread's own route, and only once its connection is guarded.
    """
    if len(route[1]) != 1 or _thread.route is not route:
        return
    item = route[5][chosen]
    handle = route[4][chosen]
    if version == item.version and getattr(handle, GUARD_ATTRIBUTE, None) is not None:
        # (Not while it could not be guarded: pick_usable() guards it at a later decision.)
        _thread.decision = Decision(chosen, item, handle, version, until, route[2], route[6])


def _decide(state: RoutingState, route: Route, now: float) -> str | None:
    """:func:`choose_replica`, remembered as the thread's last decision."""
    chosen = choose_replica(state, route, now)
    if chosen is not None:
        _remember(route, chosen, state._version, state._valid_until)
    return chosen


def _free_choice(route: Route, now: float) -> str | None:
    """The replica for a read without a user's requirement: any available one whose connection opens."""
    decision = _thread.decision
    if decision is not None and route is _thread.route and _holds(decision, now, None):
        return decision.alias
    hot = route[6]
    found: dict[str, tuple[int, float]] = {}
    for alias, item in route[5].items():
        version = item.version
        available, until = item.availability(now, None, hot)
        if available:
            found[alias] = (version, until)
    chosen = pick_usable(list(found), route[4], route[5]) if found else None
    if chosen is not None:
        _remember(route, chosen, *found[chosen])
    return chosen


class ReplicaRouter:
    """Route writes to ``PRIMARY`` and reads to one of ``REPLICAS`` when that is safe.

    A read goes to the primary when it runs inside ``atomic()``, inside :func:`use_primary`,
    after the current request wrote, or when no replica is available that has replayed the
    user's last write. The decision reads in-memory state only; it does no I/O.

    Creating it (Django does, once per process) puts a
    :class:`~django_scale.replicas.ReplicaGuard` on every replica connection opened from then
    on (:func:`~django_scale.replicas.install_guards`) and, with ``QUERY_CACHE`` on, a write
    tracker on every other one (:func:`~django_scale.cache.queries.track_writes`).
    """

    def __init__(self) -> None:
        install_guards()
        if conf.QUERY_CACHE:
            # Imported here: the query cache imports the cache package, which routing never needs.
            from django_scale.cache.queries import track_writes

            track_writes()

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        state = _state.get()
        cached = _thread
        decision = cached.decision
        alias: str | None  # (an annotation only: no step at run time)
        if (
            state is not None
            and decision is not None
            and decision.hot is state._hot
            and decision.generation == _generation[0]
            and not state.pinned
            and not hints
            and _forced.get() is None
            and _get_running_loop() is None
            and not decision.primary.in_atomic_block
            and not decision.handle.in_atomic_block
            and decision.version == decision.monitor.version
            and (now := _monotonic()) < decision.until
            and (
                # A later read of the request, whose replica is the decision's: kept while the
                # monitor's version and the availability window hold, as below.
                state.replica is decision.alias
                # The request's first read: the decision's connection and replay checked too.
                or (
                    state.replica is None
                    and decision.handle.connection is decision.raw
                    and not decision.handle.errors_occurred
                    and (not decision.checked or decision.handle.health_check_done)  # type: ignore[attr-defined]
                    and (state.required_lsn is None or decision.monitor.replay_lsn >= state.required_lsn)
                )
            )
        ):
            # The common case in as few steps as it takes (this runs for every read): a request's
            # read while the thread's last decision holds (_holds(), inlined; the decision
            # exists only for the thread's own route with one replica, and is dropped when the
            # route is looked up again), nothing forced, pinned or hinted, no transaction open
            # on the primary or the replica. The path below decides the same way, in more steps.
            alias = decision.alias
            if state.replica is None:
                state.replica = alias
                state._version = decision.version
                state._valid_until = decision.until
            if state.required_lsn is None:
                # FallbackWindow.count_read(), inlined as below.
                window = fallback_window
                if now >= window.ends:
                    window.ends, window.reads, window.fallbacks = int(now) + 1.0, 0, 0
                window.reads += 1
        else:
            hot = state._hot if state is not None else None
            if hot is None:
                hot = conf.hot()
            route = cached.route
            if (
                route is None
                or route[6] is not hot
                or cached.generation != _generation[0]
                or _get_running_loop() is not None
            ):
                if not hot.replicas:
                    return hot.primary
                route = _route(hot)
            primary = route[0]
            if hints:
                instance = hints.get("instance")
                if instance is not None and instance._state.db not in (None, primary, *route[1]):
                    # The object came from a database this router does not manage: abstain.
                    return None
            forced = _forced.get()
            alias = None
            # _in_atomic() is asked only when a connection is in a transaction (a loop, not any():
            # no generator to create on every read).
            in_atomic = route[2].in_atomic_block
            if not in_atomic:
                for handle in route[3]:
                    if handle.in_atomic_block:
                        in_atomic = True
                        break
            if in_atomic:
                in_atomic = _in_atomic(route[2], route[3])
            if forced is None and not in_atomic and state is not None and not state.pinned:
                now = _monotonic()
                alias = state.replica
                if alias is None:
                    # The request's first read: the thread's last decision if it holds, else
                    # choose_replica(). (Off the common path: the fast path above inlines it.)
                    decision = cached.decision
                    if (
                        decision is not None
                        and route is cached.route
                        and _holds(decision, now, state.required_lsn)
                    ):
                        alias = state.replica = decision.alias
                        state._version = decision.version
                        state._valid_until = decision.until
                    else:
                        alias = _decide(state, route, now)
                elif state._version != route[5][alias].version or now >= state._valid_until:
                    # (choose_replica()'s fast path, inlined: the request's later reads take it.)
                    alias = _decide(state, route, now)
                if state.required_lsn is None:
                    if alias is None:
                        alias = free_read_alias(route[1], alias, primary, now)
                        if alias == primary:
                            state.fallbacks += 1
                    else:
                        # FallbackWindow.count_read(), inlined: free_read_alias() does it otherwise.
                        window = fallback_window
                        if now >= window.ends:
                            window.ends, window.reads, window.fallbacks = int(now) + 1.0, 0, 0
                        window.reads += 1
                elif alias is None:
                    state.pin("no available replica has replayed the user's last write", fallback=True)
                    state.fallbacks += 1
            elif forced == "primary" or in_atomic:
                pass
            elif state is None or (forced == "replica" and not state.rerun):
                # Outside a request or task, or told to: any available replica.
                now = _monotonic()
                alias = free_read_alias(route[1], _free_choice(route, now), primary, now)
                if alias == primary and state is not None:
                    state.fallbacks += 1
            elif state._falls_back:
                # Pinned because no replica could serve the request (only pinned reads get here,
                # and the second run of a request inside use_replica(), which its pin covers).
                state.fallbacks += 1
            alias = alias or primary
        # (get() + 1: Counter's __missing__ is a Python call on each alias's first read. And
        # dict.get called on the Counter: reads.get would build a bound method on every read.)
        if state is not None:
            reads = state.reads
            reads[alias] = _dict_get(reads, alias, 0) + 1
        captured = _capture.get()
        if captured is not None:
            captured[alias] = _dict_get(captured, alias, 0) + 1
        return alias

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        primary, replicas = conf.aliases()
        instance = hints.get("instance")
        if instance is not None and instance._state.db not in (None, primary, *replicas):
            return None
        mark_write()
        return primary

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        primary, replicas = conf.aliases()
        ours = {primary, *replicas}
        if obj1._state.db in ours and obj2._state.db in ours:
            # The replicas hold the same rows as the primary.
            return True
        return None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        # Replicas get their schema by replication, never by running migrations.
        if db in conf.aliases()[1]:
            return False
        return None
