"""``ReplicaGuard``: a deadline for queries on a replica, and a clear error when a read fails.

The guard is installed once per replica connection object (``DatabaseWrapper``), when its
first connection opens, and stays for the object's life: requests, tasks and commands never
install or remove it, so a request that never touches a replica pays nothing for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from django.db import InterfaceError, InternalError, OperationalError
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from django_scale.conf import conf
from django_scale.exceptions import ReplicaReadError
from django_scale.replicas.errors import RECOVERY_CONFLICT, error_sqlstate, is_broken, is_read
from django_scale.replicas.monitors import monitor
from django_scale.replicas.state import _state

__all__ = ["ReplicaGuard", "Watchdog", "guard_connection", "install_guards", "is_guarded", "watchdog"]

logger = logging.getLogger("django_scale.replicas")

#: The attribute that holds a guarded connection object's entered guard (a connection object
#: lives as long as its thread, or its test's override of DATABASES; it opens and closes many
#: connections). The router reads it on a request's first read: ``is_guarded()``, inlined.
GUARD_ATTRIBUTE = "_django_scale_guard"


def is_guarded(connection: BaseDatabaseWrapper) -> bool:
    """Whether replica *connection* has its :class:`ReplicaGuard`."""
    return getattr(connection, GUARD_ATTRIBUTE, None) is not None


def guard_connection(connection: BaseDatabaseWrapper) -> bool:
    """Wrap the queries of replica *connection* in a :class:`ReplicaGuard` for its whole life.

    Return whether it is guarded; a connection object of an alias not in ``REPLICAS`` never is. It goes through the public
    :meth:`~django.db.backends.base.base.BaseDatabaseWrapper.execute_wrapper`, entered once and
    never left. That context manager pops the *last* wrapper on exit, so it is only entered
    while no other wrapper is active on the connection: entered inside a block of the caller's,
    the caller's exit would remove the guard and leave its own wrapper behind. Such a
    connection is guarded later, when the router next hands out its alias
    (``ReplicaRouter``).
    """
    if is_guarded(connection):
        return True
    if connection.alias not in conf.REPLICAS:
        # Say, the primary's connection object, which share_primary_connection() hands out
        # for the replica aliases in tests: its queries are the primary's.
        return False
    if connection.execute_wrappers:
        return False
    entered = connection.execute_wrapper(ReplicaGuard(connection.alias, connection))
    entered.__enter__()
    # Keep the entered context manager alive with its connection object: collected, its
    # generator would be closed and its ``finally`` would pop whatever wrapper is last.
    setattr(connection, GUARD_ATTRIBUTE, entered)
    return True


def _guard_new_connection(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    guard_connection(connection)


def install_guards() -> None:
    """Guard every replica connection opened from now on (``connection_created``).

    :class:`~django_scale.routers.ReplicaRouter`, :class:`~django_scale.middleware.ScaleMiddleware`
    and :func:`~django_scale.task_routing.connect_signals` call it when they are set up;
    calling it again does nothing.
    """
    connection_created.connect(_guard_new_connection, dispatch_uid="django_scale.replicas.guard", weak=False)


class ReplicaGuard(functools.partial[Any]):
    """An ``execute_wrapper`` for a replica connection: a deadline, and a clear error on failure.

    While a query runs on the replica, :data:`watchdog` shuts its socket down if the replica's
    monitor finds the replica unresponsive (a frozen host ignores server-side timeouts). A read
    outside a transaction that fails because the connection broke, or because the standby
    cancelled it for a recovery conflict (SQLSTATE 40001), raises
    :exc:`~django_scale.exceptions.ReplicaReadError`: a broken connection is reported to the
    replica's monitor (which takes the replica out of rotation) and closed, and the routing
    state of the request or task records the failure, so that
    :class:`~django_scale.middleware.ScaleMiddleware` can run a safe request again on the
    primary. No execute wrapper can hand its caller the rows of another connection's cursor,
    so the guard does not retry the query itself.

    It is a :func:`functools.partial` of :func:`_guarded_execute` with the replica's alias
    and the connection object it guards: a call goes from Django's ``functools.partial`` of
    the wrapper straight to the function, in C, where an instance's ``__call__`` took a
    lookup, a bound method and the arguments copied into new tuples on every query. Made for
    a connection object, it registers that object with the watchdog once, and a query only
    flags the object while it runs (the watchdog finds the queries running on a replica by
    looking at each registered object, not from an entry every query adds to a dict and
    removes). Made without one, each query is watched on its own (:meth:`Watchdog.watch`).
    """

    __slots__ = ()

    def __new__(cls, alias: str, connection: BaseDatabaseWrapper | None = None) -> ReplicaGuard:
        if connection is None:
            return super().__new__(cls, _watched_execute, alias, None, None)
        return super().__new__(cls, _guarded_execute, alias, connection, watchdog.register(alias, connection))

    @property
    def alias(self) -> str:
        """The replica's alias."""
        alias: str = self.args[0]
        return alias

    @property
    def connection(self) -> BaseDatabaseWrapper | None:
        """The connection object it guards (``guard_connection()`` passes it)."""
        connection: BaseDatabaseWrapper | None = self.args[1]
        return connection


def _guarded_execute(
    alias: str,
    guarded: BaseDatabaseWrapper,
    running: list[bool],
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: dict[str, Any],
) -> Any:
    """:class:`ReplicaGuard`'s call: run the query on replica *alias* under the watchdog.

    The watchdog knows the connection object (registered when the guard was made) and sees
    *running*, the flag the registration gave, set while the query runs: set first, so that a
    watchdog about to nap sees it (:meth:`Watchdog._run`), then a napping one woken.
    """
    running[0] = True
    if not watchdog._awake:
        watchdog.wake()
    try:
        return execute(sql, params, many, context)
    except (OperationalError, InterfaceError, InternalError) as exc:
        connection = context["connection"]
        if connection is not guarded and connection.alias != alias:
            # In tests the replica alias may share the primary's connection object.
            raise
        error = _read_error(alias, connection, sql, exc)
        if error is None:
            raise
        raise error from exc
    finally:
        running[0] = False


def _watched_execute(
    alias: str, guarded: None, running: None, execute: Callable[..., Any], *query: Any
) -> Any:
    """The call of a :class:`ReplicaGuard` made without a connection object: each query watched.

    *query* is what Django passes an execute wrapper: ``sql, params, many, context``.
    """
    sql, _, _, context = query
    connection = context["connection"]
    if connection.alias != alias:
        return execute(*query)
    ticket = watchdog.watch(alias, connection)
    try:
        return execute(*query)
    except (OperationalError, InterfaceError, InternalError) as exc:
        error = _read_error(alias, connection, sql, exc)
        if error is None:
            raise
        raise error from exc
    finally:
        watchdog.unwatch(ticket)


def _read_error(
    alias: str, connection: BaseDatabaseWrapper, sql: str, exc: Exception
) -> ReplicaReadError | None:
    """The :exc:`ReplicaReadError` to raise for *exc*, raised by a query on replica *alias*, or
    ``None`` to let *exc* through (an error of the query's own, or a write's, or in a transaction)."""
    sqlstate = error_sqlstate(exc)
    conflict = sqlstate == RECOVERY_CONFLICT
    broken = not conflict and is_broken(connection, sqlstate)
    if broken:
        monitor(alias).report_failure(exc)
    if not (conflict or broken) or connection.in_atomic_block or not is_read(sql):
        # The replica answered with an error of the query's own (a statement timeout,
        # say): that is the caller's to handle, and no reason to distrust the replica.
        return None
    if broken:
        # Close the broken connection so that the next read opens a new one.
        with contextlib.suppress(Exception):
            connection.close()
    cause = str(exc).strip()
    state = _state.get()
    if state is not None:
        state.replica_failed = alias
        state.pin(f"a read on replica {alias!r} failed", fallback=True)
    logger.warning("a read on replica %r failed: %s", alias, cause)
    what = "cancelled by a recovery conflict" if conflict else "its connection broke"
    return ReplicaReadError(
        f"a read on replica {alias!r} failed ({what}: {cause}). ScaleMiddleware runs a "
        "GET, HEAD or OPTIONS request that has not written once more with its reads on the "
        "primary; elsewhere, retry the work (the replica's monitor sends reads to the "
        "primary while the replica is down).",
        alias=alias,
    )


class Watchdog:
    """One daemon thread per process that cuts off queries stuck on an unresponsive replica.

    It knows the replica connection objects whose :class:`ReplicaGuard` registered them, each
    with a flag that is true while a query runs on it (set by its guard, or by :meth:`watch`),
    and the queries of other connection objects watched one by one (:meth:`watch`). While it
    is awake it looks every :attr:`tick` at the flagged connections and the watched queries,
    and shuts the socket of each one whose replica's monitor finds the replica unresponsive.
    The flag is the query's thread's, not the driver's state: a thread closing its connection
    frees the driver's state without the GIL, where the watchdog could be reading it.
    """

    #: How often the thread looks at the queries running, in seconds.
    tick = 0.05
    #: How many looks in a row must find no query running, and no query started, before the
    #: thread sleeps until the next query wakes it (20: a second without queries). A process
    #: that queries a replica every second or more often keeps it looking, and its queries
    #: never wake it: waking it is a system call and a handoff of the GIL in the query's thread,
    #: where one look costs the watchdog's thread alone.
    naps_after = 20

    def __init__(self) -> None:
        #: The registered replica connection objects: (alias, weak reference, the flag its
        #: guard sets while a query runs: a one-item list, which a query sets in fewer steps
        #: than an attribute) by the object's id. Not cleared in a forked child, which inherits
        #: the objects with their guards.
        self._guarded: dict[int, tuple[str, weakref.ReferenceType[Any], list[bool]]] = {}
        self._reset()

    def _reset(self) -> None:
        #: The queries of unregistered connection objects watched one by one (:meth:`watch`):
        #: (alias, connection object) by the connection object's id (a connection runs one
        #: query at a time). Written without a lock: one dict operation each, atomic in
        #: CPython; the thread reads a copy.
        self._inflight: dict[int, tuple[str, Any]] = {}
        self._lock = threading.Lock()
        #: Wake-ups for the sleeping thread: a C queue, so that waking it is one C call (an
        #: Event's set() runs a Condition's Python code). Only the first query after a second
        #: without any wakes it (``naps_after``).
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        #: Whether the thread is awake or about to look (read on every query: a plain attribute).
        self._awake = False
        self._thread: threading.Thread | None = None
        #: How many queries it has cut off (for tests and metrics).
        self.cut_off = 0

    def register(self, alias: str, connection: Any) -> list[bool]:
        """Watch every query that replica connection object *connection* runs, for its life.

        Return the flag (a one-item list) the connection's guard sets while a query runs.
        """
        key = id(connection)

        def forget(_reference: object, key: int = key, dog: Watchdog = self) -> None:
            dog._guarded.pop(key, None)

        running = [False]
        self._guarded[key] = (alias, weakref.ref(connection, forget), running)
        return running

    def watch(self, alias: str, connection: Any) -> int:
        """Watch the query *connection* runs now; return the ticket for :meth:`unwatch`.

        A registered connection object is flagged as its guard flags it (one entry per
        connection object, so that a query is cut off once); another one gets an entry.
        """
        key = id(connection)
        entry = self._guarded.get(key)
        if entry is not None and entry[1]() is connection:
            entry[2][0] = True
        else:
            self._inflight[key] = (alias, connection)
        if not self._awake:
            self.wake()
        return key

    def unwatch(self, ticket: int) -> None:
        entry = self._guarded.get(ticket)
        if entry is not None:
            entry[2][0] = False
        self._inflight.pop(ticket, None)

    def wake(self) -> None:
        """Have the thread look at the queries running (start it on first use)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="django-scale-watchdog", daemon=True
                    )
                    self._thread.start()
        self._awake = True
        self._wakeups.put(None)

    def _run(self) -> None:
        wakeups = self._wakeups
        idle = 0
        while True:
            wakeups.get()
            time.sleep(self.tick)
            try:
                running = self._look(time.monotonic())
            except Exception:
                # Never the end of the thread: the next look tries again.
                logger.exception("the replica watchdog's look failed")
                running = True
            if running:
                idle = 0
                # Look again after the next tick.
                wakeups.put(None)
                continue
            idle += 1
            if idle < self.naps_after:
                # Still awake: look again after the next tick.
                wakeups.put(None)
                continue
            idle = 0
            # Going to sleep. A guarded query that starts now flagged its connection before it
            # reads _awake: either it reads false and wakes the thread, or it read true before
            # this line, and then its flag shows below. A watched one is in _inflight first.
            # (Wake-ups queued meanwhile only cost a look each.)
            self._awake = False
            if self._inflight or any(flag[0] for _, _, flag in self._guarded.copy().values()):
                self._awake = True
                wakeups.put(None)

    def _look(self, now: float) -> bool:
        """Cut off what runs on an unresponsive replica; return whether any query runs."""
        running = False
        for key, (alias, connection) in self._inflight.copy().items():
            running = True
            if monitor(alias).is_unresponsive(now) and self._inflight.pop(key, None) is not None:
                self._cut_off(connection)
        verdicts: dict[str, bool] = {}
        # (A copy: a collected connection object's weak reference removes its entry at any time.)
        for alias, reference, flag in self._guarded.copy().values():
            if not flag[0] or (connection := reference()) is None:
                continue
            running = True
            unresponsive = verdicts.get(alias)
            if unresponsive is None:
                unresponsive = verdicts[alias] = monitor(alias).is_unresponsive(now)
            if unresponsive:
                # Cleared as the entry of a watched query is removed: cut off once. (The
                # query's thread clears it too once its query ends.)
                flag[0] = False
                self._cut_off(connection)
        return running

    def _cut_off(self, connection: Any) -> None:
        raw = connection.connection
        if raw is None:
            return
        try:
            fd = raw.fileno()
        except Exception:
            # Closed meanwhile (the guard closes a broken connection): psycopg2 raises
            # InterfaceError here, which must not end the watchdog's thread.
            return
        # Counted before the cut: once the socket is shut down, the query's thread runs on (its
        # request may be answered from the primary) while this thread may wait for the GIL, and
        # whoever reads the count then must see the cut. Only this thread writes the count.
        self.cut_off += 1
        try:
            # shutdown() on a duplicate reaches the shared socket: the blocked recv() in the
            # query's thread returns, and the driver raises "server closed the connection".
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.cut_off -= 1


#: The process's :class:`Watchdog`.
watchdog = Watchdog()


def _forget_after_fork() -> None:
    # A forked worker (gunicorn, Celery's prefork pool) inherits the watchdog's state but not
    # its thread or lock: start afresh in the child, in place, so every reference stays good.
    watchdog._reset()


os.register_at_fork(after_in_child=_forget_after_fork)
