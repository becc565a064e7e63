"""``ReplicaGuard``: a deadline for queries on a replica, and their retry on the primary."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db import InterfaceError, InternalError, OperationalError, connections

from django_scale.conf import conf
from django_scale.replicas.errors import RECOVERY_CONFLICT, error_sqlstate, is_broken, is_read
from django_scale.replicas.monitors import monitor
from django_scale.replicas.state import _capture, _state

__all__ = ["ReplicaGuard", "Watchdog", "guard_replicas", "watchdog"]

logger = logging.getLogger("django_scale.replicas")


@contextmanager
def guard_replicas() -> Iterator[None]:
    """Wrap the queries on each replica inside the block in a :class:`ReplicaGuard`."""
    with contextlib.ExitStack() as stack:
        for alias in conf.REPLICAS:
            stack.enter_context(connections[alias].execute_wrapper(ReplicaGuard(alias)))
        yield


class ReplicaGuard:
    """An ``execute_wrapper`` for a replica connection: deadline, and retry on the primary.

    While a query runs on the replica, :data:`watchdog` shuts its socket down if the replica's
    monitor finds the replica unresponsive (a frozen host ignores server-side timeouts). A
    read that fails because the connection broke, or because the standby cancelled it for a
    recovery conflict (SQLSTATE 40001), runs again on the primary when it is not part of a
    transaction; the caller gets its rows as if nothing happened.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        connection = context["connection"]
        if connection.alias != self.alias:
            # In tests the replica alias may share the primary's connection object.
            return execute(sql, params, many, context)
        ticket = watchdog.watch(self.alias, connection)
        try:
            return execute(sql, params, many, context)
        except (OperationalError, InterfaceError, InternalError) as exc:
            sqlstate = error_sqlstate(exc)
            conflict = sqlstate == RECOVERY_CONFLICT
            broken = not conflict and is_broken(connection, sqlstate)
            if broken:
                monitor(self.alias).report_failure(exc)
            if not (conflict or broken) or connection.in_atomic_block or not is_read(sql):
                # The replica answered with an error of the query's own (a statement timeout,
                # say): that is the caller's to handle, and no reason to distrust the replica.
                raise
            if broken:
                # Close the broken connection so that the next read opens a new one.
                with contextlib.suppress(Exception):
                    connection.close()
            logger.warning(
                "a read on replica %r failed (%s); retrying it on the primary", self.alias, str(exc).strip()
            )
            result = _retry_on_primary(sql, params, many, context)
            _recount(self.alias, conf.PRIMARY)
            return result
        finally:
            watchdog.unwatch(ticket)


def _recount(routed_to: str, served_by: str) -> None:
    """Move one read from the alias the router chose to the alias that served it."""
    for counter in (state.reads if (state := _state.get()) else None, _capture.get()):
        if counter is not None and counter[routed_to] > 0:
            counter[routed_to] -= 1
            counter[served_by] += 1
            if not counter[routed_to]:
                del counter[routed_to]


def _retry_on_primary(sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    """Run the read again through the primary's own cursor, and let the caller fetch its rows.

    The retry is an ordinary query of the primary's: its execute wrappers (such as
    :func:`~django_scale.timeouts.statement_timeout`) and its query log
    (``CaptureQueriesContext``, ``DEBUG``) see it like any other.
    """
    retry = connections[conf.PRIMARY].cursor()
    try:
        result = retry.executemany(sql, params) if many else retry.execute(sql, params)
    except BaseException:
        with contextlib.suppress(Exception):
            retry.close()
        raise
    # An execute wrapper returns what execute() returns, and the caller then reads the rows
    # from its CursorWrapper, which takes fetchone(), fetchmany(), fetchall(), iteration,
    # description and close() from its .cursor attribute (django/db/backends/utils.py,
    # CursorWrapper.__init__, __getattr__ and __iter__, the same from Django 4.2 to 6.1;
    # pinned by test_a_cursor_wrapper_reads_its_rows_from_its_cursor_attribute). No public
    # API hands an execute wrapper's caller other rows: point it at the primary's
    # CursorWrapper, so the caller reads the retried rows through the primary's error
    # wrapping, and closing the caller's cursor closes the primary's. The broken replica
    # cursor is closed quietly.
    wrapper = context["cursor"]
    broken, wrapper.cursor = wrapper.cursor, retry
    with contextlib.suppress(Exception):
        broken.close()
    return result


class Watchdog:
    """One daemon thread per process that cuts off queries stuck on an unresponsive replica."""

    #: How often the thread looks at the queries in flight, in seconds.
    tick = 0.05

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._inflight: dict[int, tuple[str, Any]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._has_work = threading.Event()
        self._thread: threading.Thread | None = None
        #: How many queries it has cut off (for tests and metrics).
        self.cut_off = 0

    def watch(self, alias: str, connection: Any) -> int:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="django-scale-watchdog", daemon=True)
                self._thread.start()
            self._next += 1
            self._inflight[self._next] = (alias, connection)
            self._has_work.set()
            return self._next

    def unwatch(self, ticket: int) -> None:
        with self._lock:
            self._inflight.pop(ticket, None)
            if not self._inflight:
                self._has_work.clear()

    def _run(self) -> None:
        while True:
            self._has_work.wait()
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                stuck = [
                    (ticket, connection)
                    for ticket, (alias, connection) in self._inflight.items()
                    if monitor(alias).is_unresponsive(now)
                ]
                for ticket, _ in stuck:
                    self._inflight.pop(ticket, None)
            for _, connection in stuck:
                self._cut_off(connection)

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
        try:
            # shutdown() on a duplicate reaches the shared socket: the blocked recv() in the
            # query's thread returns, and the driver raises "server closed the connection".
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        self.cut_off += 1


#: The process's :class:`Watchdog`.
watchdog = Watchdog()


def _forget_after_fork() -> None:
    # A forked worker (gunicorn, Celery's prefork pool) inherits the watchdog's state but not
    # its thread or lock: start afresh in the child, in place, so every reference stays good.
    watchdog._reset()


os.register_at_fork(after_in_child=_forget_after_fork)
