"""The read path of ``.cached()``: one ``MGET`` on a hit; on a miss, the query and its read position.

See :mod:`django_scale.cache.queries` for the rules; this module applies them to one queryset.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import django
from django.core.exceptions import EmptyResultSet
from django.db import connections

from django_scale import metrics
from django_scale.cache import invalidations
from django_scale.cache.degrade import breakers, trip_cache
from django_scale.cache.keys import UnstableValue, encode_key_parts
from django_scale.cache.publisher import publisher
from django_scale.cache.queries import positions, rows, writes
from django_scale.cache.queries.compiled import Compiled, compile_for_run
from django_scale.cache.queries.shared import MARKER, Entry, SharedPositions, entry_key
from django_scale.cache.queries.sql import EVERY_TABLE, read_tables
from django_scale.cache.queries.storing import writer
from django_scale.cache.store import CacheDown, RedisStore, store_for
from django_scale.conf import conf
from django_scale.exceptions import CacheArgumentError
from django_scale.replicas import current_state

logger = logging.getLogger("django_scale.cache")

__all__ = ["CacheOptions", "fetch_rows"]


@dataclass(frozen=True)
class CacheOptions:
    """The options of one ``.cached()`` call (see :meth:`~django_scale.querysets.CachedQuerySetMixin.cached`)."""

    #: Seconds an entry is kept at most (it is dropped sooner by any write to its tables).
    timeout: float = 3600.0
    #: Age (seconds since its read) up to which an invalidated entry may still be served while
    #: one refill runs; 0: never.
    stale: float = 0.0
    #: Tables the query reads that its SQL does not name (views, functions).
    tables: tuple[str, ...] = ()
    #: Part of the key: change it when the stored rows change meaning while the SQL and the
    #: model's columns stay the same (a custom field's Python value).
    version: int | str = 1

    def __post_init__(self) -> None:
        for name in ("timeout", "stale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise CacheArgumentError(
                    f"cached({name}=...) must be a number of seconds >= 0, not {value!r}."
                )
        if self.timeout == 0:
            raise CacheArgumentError(
                "cached(timeout=0) would never keep an entry: give it a number of seconds."
            )
        if not all(isinstance(table, str) and table for table in self.tables):
            raise CacheArgumentError(f"cached(tables=...) must be table names, not {self.tables!r}.")


_logged: set[str] = set()
_logged_lock = threading.Lock()


def _once(reason: str, message: str, *args: object) -> None:
    with _logged_lock:
        if reason in _logged:
            return
        _logged.add(reason)
    logger.warning(message + " (reported once per process)", *args)


_tracking = False


def _ensure_tracking() -> None:
    global _tracking
    if not _tracking:
        writes.track_writes()
        _tracking = True
    writes.ensure_tracked(connections[conf.PRIMARY])


def fetch_rows(queryset: Any, compute: Callable[[], list[Any]], options: CacheOptions) -> list[Any]:
    """Return the rows of *queryset*: from a valid entry, else from *compute* (and store them)."""
    if not conf.QUERY_CACHE:
        metrics.increment("querycache.disabled")
        return compute()
    if queryset.query.select_for_update or queryset._for_write:
        # A locking read (or a read for a write, as get_or_create() makes) must reach the
        # database: a cached row takes no lock.
        metrics.increment("querycache.bypass")
        return compute()
    db: str = queryset.db
    connection = connections[db]
    if not positions.supports(connection):
        metrics.increment("querycache.unsupported")
        _once(
            f"vendor {connection.vendor}",
            "the query cache needs PostgreSQL WAL positions; queries on %s (%s) are not cached",
            db,
            connection.vendor,
        )
        return compute()
    # Always CACHE_ALIAS: the write positions every process publishes live there, and an entry
    # must be read with them in one MGET.
    alias = conf.CACHE_ALIAS
    store = store_for(alias)
    if not isinstance(store, RedisStore):
        metrics.increment("querycache.unsupported")
        _once(
            f"cache {alias}",
            "the query cache needs django-redis; cache %r is not, queries are not cached",
            alias,
        )
        return compute()
    _ensure_tracking()
    try:
        compiled, compiler = compile_for_run(queryset.query, db)
    except EmptyResultSet:
        return compute()
    if not compiled.sql:
        return compute()  # nothing to run (Django's execute_sql() treats it as EmptyResultSet)
    shape = compiled.shape if rows.by_values(queryset) else None
    read = rows.reader(shape, db) if shape is not None else _evaluate
    database = str(connection.settings_dict["NAME"])
    iterable = queryset._iterable_class
    # The key and tables depend on the query and these alone: computed once per compiled query.
    variant = (options.version, options.tables, iterable, shape is not None, database)
    known = compiled.keys.get(variant)
    if known is None:
        known = _key_of(queryset, compiled, options, db, database, shape is not None)
        if known is None:
            return compute()
        compiled.keys[variant] = known
    key, tables = known
    primary = connections[conf.PRIMARY]
    if writes.written_in_transaction(primary, tables) or writes.written_in_transaction(connection, tables):
        # This transaction wrote a table of the query: its reads are its own, never shared.
        metrics.increment("querycache.bypass")
        return compute()
    in_transaction = connection.in_atomic_block or primary.in_atomic_block
    shared = SharedPositions(store)
    if breakers.is_open(f"cache {alias!r}"):
        return compute()
    outgoing = writer.take(alias)  # the entries of earlier misses go with this MGET
    try:
        if invalidations.due(alias):
            invalidations.replay_due(alias, store, publisher.submit)
        entry, incarnation, generation, claimed, *found = shared.fetch(
            key, db, tables, database, writer.unsent(key), outgoing, claim=bool(options.stale)
        )
    except CacheDown as error:
        _cache_down(alias, error)
        return compute()
    finally:
        writer.sent(outgoing)
    state = current_state()
    required = state.required_lsn if state is not None else None
    if (
        entry is not None
        and entry.read.incarnation == incarnation
        and entry.generation == int(generation or 0)
    ) and (required is None or entry.read.lsn >= required):
        if all(entry.read.covers(position) for position in found):
            metrics.increment("querycache.hit")
            return _served(entry.rows, shape, db, queryset)
        fresh_for_writer = state is None or not (state.wrote or state.pinned)
        if options.stale and time.time() < entry.created + options.stale and fresh_for_writer:
            metrics.increment("querycache.stale")
            if claimed:
                # A refill runs (its claim was in the MGET): trying to claim it is a round trip
                # that would fail. A claim released since only leaves the refill to a later read.
                metrics.increment("querycache.refill.suppressed")
            else:
                _refill(alias, store, shared, key, queryset, read, options, tables, db, database)
            return _served(entry.rows, shape, db, queryset)
    metrics.increment("querycache.miss")
    if in_transaction:
        # A transaction's snapshot may be older than any read position taken now: never stored.
        return compute()
    stamp = int(generation or 0)
    # The rows must come from the server whose position is taken: routing is asked once, and
    # the query pinned to its answer (asked again, it could pick another server).
    pinned: Callable[[], tuple[list[Any], list[Any]]]
    if shape is None:
        pinned = functools.partial(read, queryset.using(db))
    elif compiler is not None:
        # Compiled just now for the key: its SQL is run as it is, not compiled again.
        related = queryset._known_related_objects
        pinned = functools.partial(rows.run, shape, db, related, compiler, compiled.sql, compiled.params)
    else:
        pinned = functools.partial(read, queryset)  # (rows.reader compiles for the alias itself)
    return _read_and_store(
        alias, shared, key, pinned, db, database, tables, incarnation, found, stamp, options.timeout
    )


def _read_and_store(
    alias: str,
    shared: SharedPositions,
    key: str,
    compute: Callable[[], tuple[list[Any], list[Any]]],
    db: str,
    database: str,
    tables: Sequence[str],
    incarnation: str | None,
    found: Sequence[str | None],
    generation: int,
    timeout: float,
    send_now: bool = False,
) -> list[Any]:
    """Run the query (on a miss) and hand its entry to the writer; return the rows.

    *compute* returns the rows to store and the rows to return (:func:`_evaluate`, or
    :func:`~django_scale.cache.queries.rows.reader`'s values and instances).

    The read position is known without a round trip when the connection's server is
    (:func:`~django_scale.cache.queries.positions.known_read`); else it is asked for first.
    With *send_now* the entry is stored before this returns (a refill, whose claim is
    released after it: the entry must be there by then, or another refill would run).
    """
    connection = connections[db]
    read = positions.known_read(connection, found)
    if read is not None:
        stored, result = compute()
        if not positions.on_known_server(connection, read):
            return result  # the query ran on another connection than the one the position is of
        metrics.increment("querycache.position_known")
    else:
        read = positions.read_position(connection)
        stored, result = compute()
        if read is None:
            return result
    missing = [table for table, position in zip(tables, found, strict=True) if position is None]
    try:
        if missing:
            _seed(shared, database, missing, read, generation)
        # The generation read before the query: one bumped since makes this entry miss.
        # Pickled before the caller gets the rows: what the caller changes is not stored.
        payload = shared.encode(Entry(MARKER, read, tuple(tables), generation, time.time(), stored))
        if read.incarnation != incarnation:
            # A new incarnation (a restart, a flushed store): told at once, with the entry, so
            # that every process's older entries miss from now on. A rare miss.
            shared.store_entry(key, payload, timeout, (db, read.incarnation, writes.POSITION_KEEP))
            return result
        if send_now:
            shared.store_entry(key, payload, timeout)
            return result
    except CacheDown as error:
        _cache_down(alias, error)
        return result
    writer.submit(alias, key, payload, timeout, functools.partial(_cache_down, alias))
    return result


def _seed(
    shared: SharedPositions,
    database: str,
    tables: Sequence[str],
    read: positions.ReadPosition,
    generation: int,
) -> None:
    """Give tables without a write position one every entry read before now fails.

    Only a primary position qualifies: every write published so far is behind it, so an
    entry read before a lost position (evicted, flushed) can never pass it. A read on a
    standby asks the primary for its position (one more query, on this cold path only).
    """
    if read.standby:
        try:
            primary = positions.read_position(connections[conf.PRIMARY])
        except Exception:
            logger.warning("cannot read the primary's position to seed table positions", exc_info=True)
            return
        if primary is None:
            return
        read = primary
    # One below the read position: the primary's entries need a position strictly behind them.
    shared.seed(
        database,
        tables,
        positions.format_position(read.cluster, read.lsn - 1, bounded=True),
        writes.POSITION_KEEP,
        generation,
    )


def _refill(
    alias: str,
    store: RedisStore,
    shared: SharedPositions,
    key: str,
    queryset: Any,
    read: Callable[[Any], tuple[list[Any], list[Any]]],
    options: CacheOptions,
    tables: Sequence[str],
    db: str,
    database: str,
) -> None:
    """Claim the refill of *key*; the one caller that wins it recomputes on the publisher thread."""
    token = secrets.token_hex(8)
    try:
        if store.claim(key, token, 60.0, cold=False) is None:
            metrics.increment("querycache.refill.suppressed")
            return
    except CacheDown as error:
        _cache_down(alias, error)
        return
    clone = queryset.using(db)

    def refill() -> None:
        try:
            fetched = shared.fetch(key, db, tables, database)
            _read_and_store(
                alias,
                shared,
                key,
                functools.partial(read, clone),
                db,
                database,
                tables,
                fetched[1],
                fetched[4:],
                int(fetched[2] or 0),
                options.timeout,
                send_now=True,
            )
            metrics.increment("querycache.refill")
        except Exception:
            metrics.increment("querycache.refill.failed")
            logger.exception(
                "query cache refill of %s failed; the stale entry is served until it expires", key
            )
        finally:
            connections.close_all()
            with contextlib.suppress(CacheDown):
                store.release(key, token)

    publisher.submit(refill)


_field_salts: dict[type[Any], list[str]] = {}


def _fields_of(model: type[Any]) -> list[str]:
    """Return the column names of *model*'s concrete fields (part of every key of its queries)."""
    salt = _field_salts.get(model)
    if salt is None:
        salt = _field_salts[model] = [field.column for field in model._meta.concrete_fields]
    return salt


def _key_of(
    queryset: Any, compiled: Compiled, options: CacheOptions, db: str, database: str, values: bool
) -> tuple[str, tuple[str, ...]] | None:
    """Return the entry key and the tables of *compiled* read with *options*, or ``None`` (and
    say so once) when a parameter has no stable key."""
    iterable = queryset._iterable_class
    try:
        text = encode_key_parts(
            [
                # Model pickles name the exact Django version (Django warns on a mismatch), and
                # the fields: an entry of older code is another key, never unpickled.
                django.__version__,
                _fields_of(queryset.model),
                options.version,
                db,
                database,
                queryset.model._meta.label_lower,
                f"{iterable.__module__}.{iterable.__qualname__}",
                # How the rows are stored (rows.py): a queryset stored otherwise never reads them.
                "values" if values else "objects",
                compiled.sql,
                list(compiled.params),
            ]
        )
    except UnstableValue as error:
        _once(
            f"key {error.what}",
            "a query parameter has no stable key (%s); that query is not cached",
            error.what,
        )
        return None
    key = entry_key(hashlib.blake2b(text.encode(), digest_size=16).hexdigest())
    tables = tuple(sorted(read_tables(compiled.sql) | set(options.tables) | {EVERY_TABLE}))
    return key, tables


def _served(stored: Any, shape: rows.Shape | None, db: str, queryset: Any) -> list[Any]:
    """The rows of a valid entry, as *queryset* returns them."""
    if shape is None:
        return list(stored)
    return rows.build(shape, db, stored, queryset._known_related_objects)


def _evaluate(queryset: Any) -> tuple[list[Any], list[Any]]:
    result = list(queryset._iterable_class(queryset))
    return result, result


def _cache_down(alias: str, error: BaseException) -> None:
    invalidations.mark_due(alias)
    trip_cache(alias, error)
