"""Seeing writes: an execute wrapper on every writable connection, positions published on commit.

Signals miss ``update()``, ``bulk_create()``, ``delete()`` of a queryset and raw SQL, so the
query cache watches the statements themselves: :class:`WriteTracker`, an execute wrapper,
notes the tables each ``INSERT``/``UPDATE``/``DELETE``/``MERGE``/``COPY``/``TRUNCATE`` writes
(:func:`~django_scale.cache.queries.sql.written_tables`; a statement whose targets it cannot
name counts as writing every table), and registers :func:`publish` with
``transaction.on_commit``: once the transaction commits (at once, in autocommit), the primary's
write position is published for those tables. A rolled-back transaction's callbacks never
run, so it publishes nothing; what it noted is published with the connection's next commit
(a harmless extra invalidation). Until it commits, reads of those tables inside the
transaction bypass the cache (:func:`written_in_transaction`).

Raw SQL whose writes the text does not show (a function that writes, a ``SELECT ... INTO``)
is declared with :func:`writes_tables`.

The tracker is installed on a connection object when its connection opens
(``connection_created``), by :func:`track_writes`, which ``ReplicaRouter`` and ``.cached()``
call. It is *inserted first* in ``connection.execute_wrappers``: Django's
``execute_wrapper()`` context manager appends its wrapper and pops the *last* one on exit
(django/db/backends/base/base.py, ``BaseDatabaseWrapper.execute_wrapper``; the hook is from
ticket #28595), so a wrapper entered and left later by anyone never removes ours, and ours
is there whatever the caller entered first. The list is not documented API; a test pins its
behaviour.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from django_scale import metrics
from django_scale.cache import invalidations
from django_scale.cache.degrade import breakers, trip_cache
from django_scale.cache.queries import positions
from django_scale.cache.queries.shared import EVERYTHING, SharedPositions
from django_scale.cache.queries.sql import written_tables
from django_scale.cache.store import CacheDown, RedisStore, store_for
from django_scale.conf import conf

logger = logging.getLogger("django_scale.cache")

__all__ = [
    "WriteTracker",
    "note_statement",
    "publish",
    "track_writes",
    "writes_tables",
    "written_in_transaction",
]

#: How long a write position is kept in the store: past it, the table's entries miss.
POSITION_KEEP = 7 * 86400.0

#: Tables noted on each connection object and not yet published (a connection object
#: belongs to one thread).
_pending: weakref.WeakKeyDictionary[BaseDatabaseWrapper, set[str]] = weakref.WeakKeyDictionary()
_tracked: weakref.WeakSet[BaseDatabaseWrapper] = weakref.WeakSet()
_lock = threading.Lock()
#: Set while a failed publication is journaled: the journal's own INSERT is not a write to track.
_journaling: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "django_scale_qc_journaling", default=False
)


def _note(connection: BaseDatabaseWrapper, tables: Iterable[str]) -> None:
    pending = _pending.get(connection)
    if pending is None:
        pending = _pending[connection] = set()
    pending.update(tables)
    metrics.increment("querycache.writes_noted")
    # One callback per write statement: on commit, the first to run publishes everything
    # noted and the others find nothing left. (One per transaction would need to know when
    # a transaction ends, which only Django's private state tells.)
    transaction.on_commit(functools.partial(publish, connection), using=connection.alias)


class WriteTracker:
    """An execute wrapper that notes the tables a statement writes, for :func:`publish`."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = weakref.ref(connection)

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        if not isinstance(sql, str) or _journaling.get() or not conf.QUERY_CACHE:
            return execute(sql, params, many, context)
        tables = written_tables(sql)
        try:
            return execute(sql, params, many, context)
        finally:
            connection = self.connection()
            if tables and connection is not None:
                # Noted even when the statement failed: in autocommit it wrote nothing, and in
                # a transaction it aborts the transaction; an extra invalidation is harmless.
                _note(connection, tables)


def note_statement(connection: BaseDatabaseWrapper, sql: str) -> None:
    """Note the tables *sql* writes, for a statement sent around ``execute()`` (a driver's
    ``COPY`` API: psycopg's ``cursor.copy()``, psycopg2's ``copy_expert()``)."""
    if not conf.QUERY_CACHE or _journaling.get() or not positions.supports(connection):
        return
    tables = written_tables(sql)
    if tables:
        _note(connection, tables)


def written_in_transaction(connection: BaseDatabaseWrapper, tables: Iterable[str]) -> bool:
    """Whether the open transaction of *connection* may have written one of *tables*."""
    if not connection.in_atomic_block:
        return False
    pending = _pending.get(connection)
    if not pending:
        return False
    return "*" in pending or not pending.isdisjoint(tables)


@contextlib.contextmanager
def writes_tables(*tables: str, using: str | None = None) -> Iterator[None]:
    """Declare that the code inside the block writes *tables*, in ways its SQL does not show.

    For raw SQL such as ``SELECT my_function()`` that writes, or a table written through
    another connection (``COPY`` through a driver's own API). On exit, the tables are
    published as written (on commit of the surrounding transaction, or at once).
    """
    alias = using or conf.PRIMARY
    try:
        yield
    finally:
        names = [table.lower() if table == table.lower() else table for table in tables]
        _note(connections[alias], names)


def publish(connection: BaseDatabaseWrapper) -> None:
    """Publish the write position of every table noted on *connection* (run on commit)."""
    tables = _pending.pop(connection, None)
    if not tables:
        return
    alias = conf.CACHE_ALIAS
    if not positions.supports(connection):
        return
    store = store_for(alias)
    if not isinstance(store, RedisStore):
        return
    database = str(connection.settings_dict["NAME"])
    try:
        position = positions.write_position(connection)
    except Exception:
        # The commit happened; without a position, nothing may trust the entries any more.
        logger.exception(
            "cannot read the write position after a commit; invalidating every query cache entry"
        )
        _everything(alias, store)
        return
    if breakers.is_open(f"cache {alias!r}"):
        _everything(alias, store)
        return
    try:
        SharedPositions(store).advance(database, tables, position, POSITION_KEEP)
    except CacheDown as error:
        trip_cache(alias, error)
        invalidations.mark_due(alias)
        _everything(alias, store)
        return
    metrics.increment("querycache.published")


def _everything(alias: str, store: RedisStore) -> None:
    """Journal the invalidation of every entry: the store missed a write position."""
    metrics.increment("querycache.publish_failed")
    token = _journaling.set(True)
    try:
        where = invalidations.keep(alias, EVERYTHING, POSITION_KEEP, process_local=False)
    finally:
        _journaling.reset(token)
    logger.warning(
        "a write position could not be published; every query cache entry is invalidated (%s)", where
    )


def _install(connection: BaseDatabaseWrapper) -> None:
    if connection in _tracked or connection.alias in conf.REPLICAS or not positions.supports(connection):
        return
    with _lock:
        if connection in _tracked:
            return
        # First in the list: see the module docstring (execute_wrapper pops the last one).
        connection.execute_wrappers.insert(0, WriteTracker(connection))
        _tracked.add(connection)


def _on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    _install(connection)


def track_writes() -> None:
    """Note the tables written on every writable PostgreSQL connection of this process from now on.

    :class:`~django_scale.routers.ReplicaRouter` and the first ``.cached()`` call it; a
    process that writes with neither (a script using raw SQL only) calls it at start-up.
    Calling it again does nothing.
    """
    connection_created.connect(_on_connection_created, dispatch_uid="django_scale.querycache", weak=False)
    for connection in connections.all(initialized_only=True):
        _install(connection)


def ensure_tracked(connection: BaseDatabaseWrapper) -> None:
    """Install the tracker on *connection* now (a connection object opened before :func:`track_writes`)."""
    _install(connection)


def reset() -> None:
    """Forget the tables noted and not yet published (for tests)."""
    _pending.clear()
