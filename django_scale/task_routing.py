"""Tasks read what the request that enqueued them wrote: the Celery signal handlers.

A task published by a request that wrote carries the primary's WAL position in the message
header ``django_scale_lsn``. The worker opens a :class:`~django_scale.replicas.RoutingState`
for the task with that position: the task's reads go to a replica only once it has replayed
past it (after waiting at most ``REPLICA_WAIT``), otherwise to the primary.

The signal handlers that do this are connected by :func:`connect_signals`, which a project
that routes reads to replicas calls once in its Celery module (the web processes publish, the
workers run, and both import it). Importing a module of ``django_scale`` connects nothing
(Celery's ``app.autodiscover_tasks()`` imports :mod:`django_scale.tasks` in every project that
lists ``django_scale``, and the handlers would otherwise run on every task of every such
project). This module defines no task, so a Celery module can import it at its top.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

from celery import signals

from django_scale.conf import conf
from django_scale.middleware import current_wal_position
from django_scale.replicas import (
    STICKY_PRIMARY,
    await_replica,
    current_state,
    decode_position,
    format_lsn,
    install_guards,
    routing_state,
)

__all__ = ["HEADER", "add_position", "close_state", "connect_signals", "disconnect_signals", "open_state"]

logger = logging.getLogger("django_scale.tasks")  # the name it had in django_scale.tasks

#: The message header that carries the WAL position a task's reads must see.
HEADER = "django_scale_lsn"

# The routing state of each running task, by task id, from task_prerun to task_postrun.
_open_tasks: dict[str, ExitStack] = {}


def position_for_publish() -> str | None:
    """Return the header value a task published now must carry, or ``None`` for none."""
    state = current_state()
    if state is None:
        return None
    if state.wrote:
        position = current_wal_position(conf.PRIMARY)
        # Inside atomic() (or on a primary without WAL positions) there is no committed
        # position to wait for: the task reads from the primary.
        return position or STICKY_PRIMARY
    if state.required_lsn is not None and state.pinned:
        # The user's earlier write has not reached a replica yet: pass the requirement on.
        return format_lsn(state.required_lsn)
    if state.sticky_primary:
        return STICKY_PRIMARY
    return None


def add_position(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Put the WAL position the task must see in its headers (publisher side)."""
    if headers is None or HEADER in headers or not conf.REPLICAS:
        return
    position = position_for_publish()
    if position is not None:
        headers[HEADER] = position


def _header(task: Any) -> str | None:
    request = task.request
    value = getattr(request, HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(HEADER)
    return value if isinstance(value, str) else None


def open_state(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    """Open the task's routing state from its header (worker side)."""
    if task_id is None or task is None or getattr(task.request, "is_eager", False):
        # An eager task runs inside its caller's request and routing state.
        return
    value = _header(task)
    required, sticky = decode_position(value)
    if sticky and value != STICKY_PRIMARY:
        logger.warning(
            "task %s has a malformed %s header %r; reading from the primary", task_id, HEADER, value
        )
    stack = ExitStack()
    state = stack.enter_context(routing_state(required, sticky_primary=sticky))
    await_replica(state, "no replica replayed the write of the request that enqueued the task")
    _open_tasks[task_id] = stack


def close_state(task_id: str | None = None, **kwargs: Any) -> None:
    """Close the task's routing state (worker side)."""
    stack = _open_tasks.pop(task_id, None) if task_id is not None else None
    if stack is not None:
        stack.close()


# (signal, receiver, dispatch_uid) of every handler connect_signals() connects.
_RECEIVERS = (
    (signals.before_task_publish, add_position, "django_scale.tasks.add_position"),
    (signals.task_prerun, open_state, "django_scale.tasks.open_state"),
    (signals.task_postrun, close_state, "django_scale.tasks.close_state"),
)


def connect_signals() -> None:
    """Make tasks read what the request that enqueued them wrote (connect the signal handlers).

    Call it once in your Celery module, after creating the app: publishing processes then put
    the WAL position a task must see in its headers, and workers open the task's routing state
    from it. Connecting again does nothing. It also puts a
    :class:`~django_scale.replicas.ReplicaGuard` on every replica connection opened from then
    on (:func:`~django_scale.replicas.install_guards`). A task whose read fails on a replica
    gets :exc:`~django_scale.exceptions.ReplicaReadError`; retry it with Celery's
    ``autoretry_for``.
    """
    install_guards()
    for signal, receiver, uid in _RECEIVERS:
        signal.connect(receiver, dispatch_uid=uid, weak=False)


def disconnect_signals() -> None:
    """Disconnect what :func:`connect_signals` connected (for tests)."""
    for signal, receiver, uid in _RECEIVERS:
        signal.disconnect(receiver, dispatch_uid=uid)
