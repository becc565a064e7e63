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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_scale.cache")

__all__ = ["ReadPosition", "format_position", "read_position", "supports", "write_position"]


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
  extract(epoch FROM pg_postmaster_start_time())::text
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


def format_position(cluster: str, lsn: int) -> str:
    """Return a write position as stored: the cluster and a fixed-width hex LSN (compared as text)."""
    return f"{cluster}|{lsn:016x}"


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
        cluster, _, lsn = position.partition("|")
        if cluster != self.cluster or len(lsn) != 16:
            return False
        ours = f"{self.lsn:016x}"
        return ours >= lsn if self.standby else ours > lsn


def read_position(connection: BaseDatabaseWrapper) -> ReadPosition | None:
    """Return the read position of *connection*'s server now (one query), or ``None`` when a
    standby has no replay position yet."""
    with connection.cursor() as cursor:
        cursor.execute(_READ_SQL)
        row: Any = cursor.fetchone()
    lsn, standby, system, timeline, started = row
    if lsn is None:
        return None
    return ReadPosition(_lsn(lsn), bool(standby), f"{system}:{timeline}", f"{system}:{timeline}:{started}")


def write_position(connection: BaseDatabaseWrapper) -> tuple[str, int]:
    """Return ``(cluster, lsn)``: the position past every commit made so far on *connection*'s
    server (the primary), taken outside any transaction of the caller's."""
    with connection.cursor() as cursor:
        cursor.execute(_WRITE_SQL)
        row: Any = cursor.fetchone()
    # A read before the record started is at most its start, so strictly behind its last
    # byte; a read after it is at least its end, so strictly past it.
    return row[1], _lsn(row[0]) - (1 if row[2] else 0)
