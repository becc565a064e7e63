"""WAL positions of reads and writes, on the database and in the shared store.

The query cache compares two kinds of PostgreSQL WAL positions, never clocks:

* a **read position**, taken on the server that runs a query, in the same round trip as its
  server's identity, just before the query: the standby's replay position, or the
  primary's current insert position;
* a **write position** per table, taken on the primary after a transaction that wrote the
  table committed, and published to the shared store (Redis) with a compare-and-set that
  only moves it forward.

An entry read at ``r`` is valid while ``r`` is at or past every write position of its
tables. On the primary, a commit's record can be in the WAL before the commit is visible to
other sessions (for as long as synchronous replication waits), so a read there counts only
if it is *strictly* past the write position; to make "strictly past" reachable on an idle
server, the writer's position is the last byte of a small WAL record it emits after its commit
(``pg_logical_emit_message``), which every later read position passes. On a standby a replayed
commit is visible, so ``r >= position`` is enough.

A server's identity is its system identifier, timeline and start time: a restarted,
restored or replaced server has a new one, and every entry read on the old one misses once
a miss on its alias has learned it. A write position carries the system identifier and
timeline it was taken on: after a restore (a new timeline, whose positions restart lower) or
on another cluster, positions are compared with nothing of the old one.

**A miss without a position query.** A read position only has to be a *lower bound*: an
entry said to be older than it is only misses sooner. :func:`known_read` finds one without a
round trip, for a connection whose server this process has identified (the first miss on
each database connection asks it, :func:`read_position`):

* On the primary: the largest write position of the entry's tables, read in the entry's
  ``MGET`` before the query, *if* it is marked as bounded (``|<hex>+``): its successor was the
  primary's insert position when the writer (or a seeding read) took it. Every write
  published later than that moment has a position at or past that successor: a message
  record emitted later starts at or past it (its last byte is past it), and an insert
  position read later is at or past it. So a write the query may not have seen (one that
  became visible after the ``MGET`` returned, the query's snapshot being taken after it) is
  never covered (``>``, strictly). A write whose published position the ``MGET`` saw was
  visible before its publication, so before the query. Positions without the mark (a role
  that may not emit the message: an insert position read after the commit, which a
  concurrent commit still waiting to become visible can share; or a publisher of an older
  version) give no bound: the miss asks the server, as before.
* On a standby: the replay position its replica monitor's last probe read, if the probe
  reached the same server (start time and port) and was sent after the connection was
  identified. Replay only moves forward within one run of a server, and a restart (a crash
  restart too, which keeps the start time) ends every connection: a query that succeeds on
  a connection opened before the probe ran on the run the probe saw, after it, so on a
  server that has replayed at least that much.

Neither holds through a transaction pooler (``POOLER``: a client connection outlives the
server behind it), so a transaction-pooled alias asks its server on every miss.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from django_scale.conf import conf

logger = logging.getLogger("django_scale.cache")

__all__ = [
    "ReadPosition",
    "format_position",
    "known_read",
    "on_known_server",
    "read_position",
    "supports",
    "write_position",
]


#: One round trip: the read position, whether the server is a standby, and its identity. The
#: pg_control functions are restricted to privileged roles on some installations: without
#: them the identity is the start time alone (a restart is still seen; a replaced cluster
#: started at the same second is not).
_READ_SQL = """
SELECT
  CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END::text,
  pg_is_in_recovery(),
  CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE')
       THEN (SELECT system_identifier::text FROM pg_control_system()) ELSE '' END,
  CASE WHEN has_function_privilege('pg_control_checkpoint()', 'EXECUTE')
       THEN (SELECT timeline_id::text FROM pg_control_checkpoint()) ELSE '' END,
  extract(epoch FROM pg_postmaster_start_time())::text,
  pg_postmaster_start_time()::text || ' ' || current_setting('port')
"""

#: After a commit, on the primary: a WAL record of our own, whose last byte is the write
#: position (see the module docstring; the function returns the record's end), or the insert
#: position where the role may not emit one. The message is transactional: the statement's
#: own commit flushes it, so standbys receive it now (a non-transactional one waits in the
#: WAL buffers for the WAL writer).
_WRITE_SQL = """
WITH emit AS (
  -- PostgreSQL 17 added a fourth argument (flush, default false): look the text variant up by
  -- name, so that the check works on both signatures.
  SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_proc
    WHERE proname = 'pg_logical_emit_message'
      AND proargtypes[2] = 'pg_catalog.text'::pg_catalog.regtype
      AND has_function_privilege(oid, 'EXECUTE')
  ) AS allowed
)
SELECT
  CASE WHEN emit.allowed
       THEN pg_logical_emit_message(true, 'django_scale.querycache', ''::text)
       ELSE pg_current_wal_insert_lsn() END::text,
  CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE')
       THEN (SELECT system_identifier::text FROM pg_control_system()) ELSE '' END
  || ':' ||
  CASE WHEN has_function_privilege('pg_control_checkpoint()', 'EXECUTE')
       THEN (SELECT timeline_id::text FROM pg_control_checkpoint()) ELSE '' END,
  emit.allowed
FROM emit
"""


def supports(connection: BaseDatabaseWrapper) -> bool:
    """Whether the query cache can work on *connection*: PostgreSQL only (see docs/querycache.md)."""
    return connection.vendor == "postgresql"


def _lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


#: The mark of a bounded write position: its successor was an insert position of the primary
#: when it was taken (see the module docstring). It sorts after the same LSN unmarked.
BOUNDED = "+"


def format_position(cluster: str, lsn: int, *, bounded: bool = False) -> str:
    """Return a write position as stored: the cluster and a fixed-width hex LSN (compared as
    text), marked when *bounded* (``lsn + 1`` was an insert position of the primary)."""
    return f"{cluster}|{lsn:016x}{BOUNDED if bounded else ''}"


def _parse(position: str) -> tuple[str, str, bool] | None:
    """Return ``(cluster, hex LSN, bounded)`` of a stored write position, or ``None``."""
    cluster, _, rest = position.partition("|")
    lsn, mark = rest[:16], rest[16:]
    if len(lsn) != 16 or mark not in ("", BOUNDED):
        return None
    return cluster, lsn, bool(mark)


@dataclass(frozen=True)
class ReadPosition:
    """Where a query read: the position, and the server it read on."""

    #: The WAL position (an integer LSN) the query's data is at least as new as.
    lsn: int
    #: Whether the position is a standby's replay position (``>=`` suffices) or the
    #: primary's insert position (a write must be strictly older).
    standby: bool
    #: The database cluster and its timeline (``"system identifier:timeline"``): write
    #: positions of another cluster, or of the timeline before a restore, never count.
    cluster: str
    #: The cluster, its timeline and its server's start time: changes on a restart or restore.
    incarnation: str

    def covers(self, position: str | None) -> bool:
        """Whether data read here includes the write at *position* (as stored; ``None``: unknown)."""
        if position is None:
            return False
        parsed = _parse(position)
        if parsed is None or parsed[0] != self.cluster:
            return False
        lsn = int(parsed[1], 16)
        return self.lsn >= lsn if self.standby else self.lsn > lsn


#: Per connection object: the DB-API connection whose server was identified, that server's
#: read position then (its cluster, incarnation and whether it is a standby), its identity in
#: the replica monitors' form, and when (``time.monotonic()``, before the query) it was
#: identified. A connection object belongs to one thread.
_servers: weakref.WeakKeyDictionary[BaseDatabaseWrapper, tuple[Any, ReadPosition, str, float]] = (
    weakref.WeakKeyDictionary()
)
_servers_lock = threading.Lock()


def _forget_after_fork() -> None:
    # A forked child (gunicorn, Celery's prefork pool) must not use the parent's connections,
    # nor a lock another thread of the parent held at the fork.
    global _servers_lock
    _servers.clear()
    _servers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def read_position(connection: BaseDatabaseWrapper) -> ReadPosition | None:
    """Return the read position of *connection*'s server now (one query), or ``None`` when a
    standby has no replay position yet. The server is remembered for :func:`known_read`."""
    with connection.cursor() as cursor:
        asked = time.monotonic()
        cursor.execute(_READ_SQL)
        row: Any = cursor.fetchone()
    lsn, standby, system, timeline, started, server = row
    if lsn is None:
        return None
    read = ReadPosition(_lsn(lsn), bool(standby), f"{system}:{timeline}", f"{system}:{timeline}:{started}")
    with _servers_lock:
        known = _servers.get(connection)
        if known is not None and known[0] is connection.connection:
            asked = known[3]  # the same connection since then: the same run of the server
        _servers[connection] = (connection.connection, read, str(server), asked)
    return read


def known_read(connection: BaseDatabaseWrapper, found: Sequence[str | None]) -> ReadPosition | None:
    """Return a read position for a query about to run on *connection*, without a round trip,
    or ``None`` when only :func:`read_position` can tell (see the module docstring).

    *found* are the write positions of the query's tables, as the ``MGET`` before the query
    read them. Check :func:`on_known_server` after the query.
    """
    known = _servers.get(connection)
    if known is None or known[0] is None or connection.connection is not known[0]:
        return None
    if conf.transaction_pooled(connection.alias):
        return None
    _, read, server, identified = known
    found_read: ReadPosition | None = None
    if read.standby:
        if connection.alias in conf.REPLICAS:
            from django_scale.replicas import monitor

            probed = monitor(connection.alias).probed
            if probed is not None and probed[1] == server and probed[2] > identified:
                found_read = ReadPosition(probed[0], True, read.cluster, read.incarnation)
    else:
        # The largest position, if bounded (a position of another cluster fails covers()).
        parsed = [None if position is None else _parse(position) for position in found]
        largest = max(((item[1], item[2]) for item in parsed if item is not None), default=None)
        if largest is not None and largest[1]:
            found_read = ReadPosition(int(largest[0], 16) + 1, False, read.cluster, read.incarnation)
    # Only a position the entry is valid at from the start: else the server is asked (a
    # standby may have replayed further than its monitor saw; a table may have no position).
    if found_read is None or not all(found_read.covers(position) for position in found):
        return None
    return found_read


def on_known_server(connection: BaseDatabaseWrapper, read: ReadPosition) -> bool:
    """Whether *connection* is still the DB-API connection *read* (from :func:`known_read`)
    was found for: a query that succeeded on it ran on the same run of the same server."""
    known = _servers.get(connection)
    return (
        known is not None and known[0] is connection.connection and known[1].incarnation == read.incarnation
    )


def write_position(connection: BaseDatabaseWrapper) -> str:
    """Return the write position, as stored, past every commit made so far on *connection*'s
    server (the primary), taken outside any transaction of the caller's."""
    with connection.cursor() as cursor:
        cursor.execute(_WRITE_SQL)
        row: Any = cursor.fetchone()
    # A read before the record started is at most its start, so strictly behind its last
    # byte; a read after it is at least its end, so strictly past it. The end was the insert
    # position once the record was in: the position is bounded.
    emitted = bool(row[2])
    return format_position(row[1], _lsn(row[0]) - (1 if emitted else 0), bounded=emitted)
