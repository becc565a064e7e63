"""What PostgreSQL knows about statements and indexes: ``pg_stat_statements``, index scans
summed over the primary and every replica, duplicate indexes, and writes per table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections

__all__ = [
    "DuplicateIndex",
    "HeavyStatement",
    "UnusedIndex",
    "duplicate_indexes",
    "extension_state",
    "heavy_statements",
    "table_writes",
    "unused_indexes",
]


@dataclass(frozen=True)
class HeavyStatement:
    """One row of ``pg_stat_statements``: a normalized statement and its totals."""

    #: ``pg_stat_statements.queryid``.
    queryid: int
    #: The statement, constants as ``$1``, ``$2``...
    query: str
    calls: int
    total_ms: float
    mean_ms: float


@dataclass(frozen=True)
class UnusedIndex:
    """An index no alias has scanned since its statistics were reset."""

    table: str
    name: str
    #: Scans on each alias (all zero).
    scans: dict[str, int]
    size_bytes: int
    definition: str


@dataclass(frozen=True)
class DuplicateIndex:
    """An index whose columns another index of the table starts with (or has exactly)."""

    table: str
    name: str
    #: The index that serves everything this one does.
    covered_by: str
    size_bytes: int
    definition: str


def _rows(alias: str, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def extension_state(alias: str, name: str) -> str:
    """Return ``"installed"``, ``"available"`` (``CREATE EXTENSION`` would work) or ``"missing"``
    for extension *name* on *alias*; ``"unloaded"`` for ``pg_stat_statements`` created but not
    in ``shared_preload_libraries``."""
    rows = _rows(
        alias,
        "SELECT (SELECT 1 FROM pg_extension WHERE extname = %s), "
        "(SELECT 1 FROM pg_available_extensions WHERE name = %s)",
        [name, name],
    )
    installed, available = rows[0]
    if not installed:
        return "available" if available else "missing"
    if name == "pg_stat_statements":
        libraries = _rows(alias, "SELECT current_setting('shared_preload_libraries')")[0][0]
        if "pg_stat_statements" not in str(libraries):
            return "unloaded"
    return "installed"


def heavy_statements(alias: str, limit: int = 20) -> list[HeavyStatement]:
    """Return this database's statements with the most total time (``pg_stat_statements``)."""
    rows = _rows(
        alias,
        "SELECT queryid, query, calls, total_exec_time, mean_exec_time FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND toplevel AND query ~* '^\\s*(select|with|update|delete)\\s' "
        "AND query !~* '(pg_stat_|hypopg|pg_catalog\\.|pg_extension|pg_available_extensions|current_setting|EXPLAIN)' "
        "ORDER BY total_exec_time DESC LIMIT %s",
        [limit],
    )
    return [HeavyStatement(int(q), str(text), int(n), float(t), float(m)) for q, text, n, t, m in rows]


def statement_totals(alias: str, queryids: Sequence[int]) -> dict[int, tuple[int, float]]:
    """Return the calls and total milliseconds of each of *queryids* (``pg_stat_statements``)."""
    if not queryids:
        return {}
    rows = _rows(
        alias,
        "SELECT queryid, sum(calls), sum(total_exec_time) FROM pg_stat_statements "
        "WHERE queryid = ANY(%s) GROUP BY queryid",
        [list(queryids)],
    )
    return {int(q): (int(n), float(t)) for q, n, t in rows}


_INDEX_USAGE = (
    "SELECT s.relname, s.indexrelname, s.idx_scan, pg_relation_size(s.indexrelid), "
    "pg_get_indexdef(s.indexrelid), i.indisunique OR i.indisprimary "
    "FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid"
)


def unused_indexes(aliases: Sequence[str]) -> list[UnusedIndex]:
    """Return the indexes that no alias of *aliases* has scanned: scans are summed over the
    primary and every replica, so an index only replica reads use is not unused. Unique and
    primary key indexes are never reported (they enforce a constraint)."""
    scans: dict[tuple[str, str], dict[str, int]] = {}
    details: dict[tuple[str, str], tuple[int, str, bool]] = {}
    for alias in aliases:
        with connections[alias].cursor() as cursor:
            # Statistics are read once per transaction: clear that snapshot to see current ones.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(_INDEX_USAGE)
            for table, name, count, size, definition, unique in cursor.fetchall():
                scans.setdefault((table, name), {})[alias] = int(count or 0)
                details.setdefault((table, name), (int(size), str(definition), bool(unique)))
    return [
        UnusedIndex(table, name, by_alias, details[(table, name)][0], details[(table, name)][1])
        for (table, name), by_alias in sorted(scans.items())
        if not sum(by_alias.values()) and not details[(table, name)][2]
    ]


def duplicate_indexes(alias: str) -> list[DuplicateIndex]:
    """Return plain B-tree indexes whose key columns another index of the table starts with."""
    rows = _rows(
        alias,
        "SELECT c.relname, ic.relname, i.indkey::text, i.indoption::text, i.indclass::text, "
        "i.indisunique OR i.indisprimary, pg_relation_size(i.indexrelid), pg_get_indexdef(i.indexrelid) "
        "FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class c ON c.oid = i.indrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am am ON am.oid = ic.relam "
        "WHERE am.amname = 'btree' AND i.indpred IS NULL AND i.indexprs IS NULL "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast' "
        "ORDER BY c.relname, ic.relname",
    )
    found: list[DuplicateIndex] = []
    by_table: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_table.setdefault(row[0], []).append(row)
    for table, indexes in by_table.items():
        for name, keys, options, classes, unique, size, definition in (row[1:] for row in indexes):
            if unique:
                continue
            key = list(zip(keys.split(), options.split(), classes.split(), strict=False))
            for other in indexes:
                other_key = list(zip(other[2].split(), other[3].split(), other[4].split(), strict=False))
                if other[1] == name or len(other_key) < len(key) or other_key[: len(key)] != key:
                    continue
                if len(other_key) == len(key) and not other[5] and other[1] > name:
                    continue  # of two equal plain indexes, report the later-named one
                found.append(DuplicateIndex(table, name, other[1], int(size), definition))
                break
    return found


def table_writes(alias: str, table: str) -> tuple[int, int, int]:
    """Return the rows written (inserted + updated + deleted) to *table* since the statistics
    were reset, its live rows, and how many indexes each write already updates."""
    rows = _rows(
        alias,
        "SELECT coalesce(n_tup_ins + n_tup_upd + n_tup_del, 0), coalesce(n_live_tup, 0), "
        "(SELECT count(*) FROM pg_index WHERE indrelid = relid) "
        "FROM pg_stat_user_tables WHERE relname = %s",
        [table],
    )
    return (int(rows[0][0]), int(rows[0][1]), int(rows[0][2])) if rows else (0, 0, 0)
