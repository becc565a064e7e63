"""The index advisor: plan the heaviest statements, try candidate indexes with HypoPG, keep
those that cut the estimated cost by half or more.

Statements come from ``pg_stat_statements`` (normalized, constants as ``$1``) and from the
slow-query log (:mod:`django_scale.slowlog`), whose examples carry their real parameters. A
statement with an example is planned with those values, as it ran; one without is planned as
a generic plan (``PREPARE`` with ``plan_cache_mode = force_generic_plan``), which does not
depend on parameter values. dexter plans with ``NULL`` for every parameter instead
(``planning="null"`` here, for comparison): ``status = NULL`` is never true, so the planner
proves the result empty and no index looks useful.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from django.db import connections, transaction

from django_scale.indexes.stats import HeavyStatement, extension_state, heavy_statements, table_writes
from django_scale.slowlog import SlowQuery, fingerprint

__all__ = ["Advice", "Candidate", "Planned", "Suggestion", "advise", "plan_cost"]

Planning = Literal["example", "generic", "null"]

#: The share of the estimated cost an index must cut to be proposed (dexter's rule).
MIN_COST_CUT = 0.5

_ORDER_BY = re.compile(r"\bORDER BY (.+?)(?:\s+LIMIT\b|\s+OFFSET\b|\s+FOR\s+UPDATE\b|\s*$)", re.I | re.S)
_ORDER_ITEM = re.compile(r'^(?:"?(\w+)"?\.)?"?(\w+)"?(?:\s+(ASC|DESC))?(?:\s+NULLS\s+(?:FIRST|LAST))?$', re.I)
_PARAMETER = re.compile(r"\$(\d+)")
_SCANS = ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan")


@dataclass(frozen=True)
class Candidate:
    """An index to try: a table and its columns, each ``(column, descending)``."""

    table: str
    columns: tuple[tuple[str, bool], ...]

    @property
    def definition(self) -> str:
        """Its ``CREATE INDEX`` statement (unnamed: PostgreSQL or the migration names it)."""
        keys = ", ".join(f'"{column}"{" DESC" if desc else ""}' for column, desc in self.columns)
        return f'CREATE INDEX ON "{self.table}" ({keys})'


@dataclass(frozen=True)
class Planned:
    """One statement the advisor planned, with and without the best candidate."""

    #: The statement (an example with ``%s``, or normalized with ``$1``).
    sql: str
    #: How it was planned: with the slow-query log's real parameters, as a generic plan, or
    #: with ``NULL`` parameters (dexter's way).
    planning: Planning
    cost_before: float
    cost_after: float
    #: ``pg_stat_statements.queryid`` when the statement came from there.
    queryid: int | None = None
    #: Its total and mean time (``pg_stat_statements`` or the slow-query log), milliseconds.
    total_ms: float = 0.0
    mean_ms: float = 0.0

    @property
    def cut(self) -> float:
        """The share of the estimated cost the candidate cuts (``0.75`` = 75 % cheaper)."""
        return 1 - self.cost_after / self.cost_before if self.cost_before > 0 else 0.0


@dataclass
class Suggestion:
    """A proposed index: proven by HypoPG to cut the cost of the statements it serves."""

    candidate: Candidate
    statements: list[Planned] = field(default_factory=list)
    #: HypoPG's estimate of its size.
    size_bytes: int = 0
    #: Rows written to the table since its statistics were reset (each would update it too),
    #: its live rows, and how many indexes each write updates already.
    writes: int = 0
    live_rows: int = 0
    existing_indexes: int = 0


@dataclass
class Advice:
    """What :func:`advise` found."""

    suggestions: list[Suggestion] = field(default_factory=list)
    #: Statements for which no candidate cut the cost by half, with the best one's figures.
    rejected: list[tuple[Planned, Candidate | None]] = field(default_factory=list)
    #: What could not be done and what to install (``"CREATE EXTENSION hypopg"``).
    notes: list[str] = field(default_factory=list)
    #: Whether HypoPG proved the suggestions (else they are unproven candidates).
    proven: bool = True


def _explain(cursor: Any, sql: str, params: Any) -> dict[str, Any]:
    cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
    raw = cursor.fetchone()[0]
    document = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    return dict(document[0]["Plan"])


def plan(alias: str, sql: str, params: Any, planning: Planning) -> dict[str, Any]:
    """Return the plan (the top node of ``EXPLAIN (FORMAT JSON)``) of *sql*, planned as *planning* says."""
    with connections[alias].cursor() as cursor:
        if planning == "example":
            return _explain(cursor, sql, params)
        count = max((int(n) for n in _PARAMETER.findall(sql)), default=0)
        if planning == "null":
            return _explain(cursor, _PARAMETER.sub("NULL", sql), None)
        if not count:
            return _explain(cursor, sql, None)
        # A generic plan: the same for any parameter values, so NULLs stand in for them.
        with transaction.atomic(using=alias):
            cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            cursor.execute(f"PREPARE django_scale_advisor AS {sql}")
            try:
                return _explain(cursor, f"EXECUTE django_scale_advisor({', '.join(['NULL'] * count)})", None)
            finally:
                cursor.execute("DEALLOCATE django_scale_advisor")


def plan_cost(alias: str, sql: str, params: Any, planning: Planning) -> float:
    """Return the planned total cost of *sql*."""
    return float(plan(alias, sql, params, planning)["Total Cost"])


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", ()):
        found.extend(_nodes(child))
    return found


def _columns_of(alias: str, table: str) -> set[str]:
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped",
            [f'"{table}"'],
        )
        return {str(row[0]) for row in cursor.fetchall()}


def _compared(condition: str, columns: set[str]) -> tuple[list[str], list[str]]:
    """Return the columns *condition* (a plan's Filter) compares by equality and by range."""
    equal: list[str] = []
    ranged: list[str] = []
    for column in sorted(columns, key=lambda name: condition.find(name)):
        pattern = (
            rf"(?<![\w$])(?:\w+\.)?\"?{re.escape(column)}\"?\)?(?:::[\w ]+?)?\)?\s*(=|>=|<=|<|>|IS NULL)"
        )
        for match in re.finditer(pattern, condition):
            (equal if match.group(1) in ("=", "IS NULL") else ranged).append(column)
    return list(dict.fromkeys(equal)), [c for c in dict.fromkeys(ranged) if c not in equal]


def _order(sql: str, table: str, columns: set[str]) -> list[tuple[str, bool]]:
    match = _ORDER_BY.search(sql)
    if not match:
        return []
    order: list[tuple[str, bool]] = []
    for item in match.group(1).split(","):
        parsed = _ORDER_ITEM.match(item.strip())
        if not parsed or (parsed.group(1) and parsed.group(1) != table) or parsed.group(2) not in columns:
            return []  # an expression or another table's column: no index of this table serves it
        order.append((parsed.group(2), (parsed.group(3) or "").upper() == "DESC"))
    return order


def candidates(alias: str, sql: str, top: dict[str, Any]) -> list[Candidate]:
    """Return the indexes worth trying for *sql*: its filters' columns, then its ordering."""
    found: list[Candidate] = []
    for node in _nodes(top):
        table = node.get("Relation Name")
        if node.get("Node Type") not in _SCANS or not table:
            continue
        columns = _columns_of(alias, table)
        condition = " ".join(str(node.get(key, "")) for key in ("Filter", "Index Cond", "Recheck Cond"))
        equal, ranged = _compared(condition, columns)
        order = [item for item in _order(sql, table, columns) if item[0] not in equal]
        shapes: list[list[tuple[str, bool]]] = []
        eq = [(column, False) for column in equal]
        if eq and order:
            shapes.append(eq + order)
        if eq and ranged:
            shapes.append([*eq, (ranged[0], False)])
        if eq:
            shapes.append(eq)
        if ranged:
            shapes.append([(ranged[0], False)])
        if order:
            shapes.append(order)
        for shape in shapes:
            candidate = Candidate(table, tuple(shape))
            if candidate not in found:
                found.append(candidate)
    return found


def _hypothetical_cost(
    alias: str, candidate: Candidate, sql: str, params: Any, planning: Planning
) -> tuple[float, int]:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT indexrelid FROM hypopg_create_index(%s)", [candidate.definition])
        oid = cursor.fetchone()[0]
        try:
            cursor.execute("SELECT hypopg_relation_size(%s)", [oid])
            size = int(cursor.fetchone()[0])
            return plan_cost(alias, sql, params, planning), size
        finally:
            cursor.execute("SELECT hypopg_reset()")


@dataclass(frozen=True)
class _Work:
    sql: str
    params: Any
    planning: Planning
    queryid: int | None
    total_ms: float
    mean_ms: float


def _work(
    statements: Sequence[HeavyStatement], slow: Sequence[SlowQuery], null_planning: bool
) -> list[_Work]:
    examples = {record.fingerprint: record for record in slow if record.example_params is not None}
    work: list[_Work] = []
    used: set[str] = set()
    for statement in statements:
        example = examples.get(fingerprint(statement.query))
        if example is not None and not null_planning:
            used.add(example.fingerprint)
            sql, params = example.example_sql, example.example_params
            planning: Planning = "example"
        else:
            sql, params, planning = statement.query, None, ("null" if null_planning else "generic")
        work.append(_Work(sql, params, planning, statement.queryid, statement.total_ms, statement.mean_ms))
    if not null_planning:
        for record in slow:
            if record.fingerprint not in used and record.example_params is not None:
                work.append(
                    _Work(
                        record.example_sql,
                        record.example_params,
                        "example",
                        None,
                        record.total_ms,
                        record.mean_ms,
                    )
                )
    return work


def _merge_statements(statements: Sequence[HeavyStatement]) -> list[HeavyStatement]:
    """Sum the figures of one statement seen on several servers (a physical replica computes
    the same ``queryid``); the most total time first."""
    merged: dict[int, HeavyStatement] = {}
    for statement in statements:
        seen = merged.get(statement.queryid)
        if seen is None:
            merged[statement.queryid] = statement
            continue
        calls, total = seen.calls + statement.calls, seen.total_ms + statement.total_ms
        merged[statement.queryid] = HeavyStatement(
            seen.queryid, seen.query, calls, total, total / calls if calls else 0.0
        )
    return sorted(merged.values(), key=lambda statement: -statement.total_ms)


def advise(
    using: str = "default",
    *,
    limit: int = 20,
    slow: Sequence[SlowQuery] = (),
    planning: Literal["best", "null"] = "best",
    statements_from: Sequence[str] = (),
) -> Advice:
    """Propose indexes for *using*'s heaviest statements (``pg_stat_statements``) and the
    slow-query log's *slow* records, each proven with HypoPG to cut the estimated cost >= 50 %.

    With ``planning="null"`` statements are planned as dexter does, every parameter ``NULL``.
    *statements_from* adds the ``pg_stat_statements`` of other aliases (the replicas, where
    most reads run); every statement is planned on *using*.
    """
    advice = Advice()
    statements: list[HeavyStatement] = []
    state = extension_state(using, "pg_stat_statements")
    if state == "installed":
        statements = heavy_statements(using, limit)
        for alias in statements_from:
            if alias != using and extension_state(alias, "pg_stat_statements") == "installed":
                statements.extend(heavy_statements(alias, limit))
        statements = _merge_statements(statements)[:limit]
    else:
        advice.notes.append(
            {
                "missing": "pg_stat_statements is not available: install PostgreSQL's contrib "
                "package, set shared_preload_libraries = 'pg_stat_statements' and run "
                "CREATE EXTENSION pg_stat_statements. Using the slow-query log alone.",
                "available": "pg_stat_statements is not created in this database: run "
                "CREATE EXTENSION pg_stat_statements (and set shared_preload_libraries). "
                "Using the slow-query log alone.",
                "unloaded": "pg_stat_statements is created but not loaded: add it to "
                "shared_preload_libraries and restart PostgreSQL. Using the slow-query log alone.",
            }[state]
        )
    hypopg = extension_state(using, "hypopg")
    if hypopg != "installed":
        advice.proven = False
        advice.notes.append(
            "HypoPG is not installed, so candidate indexes are listed unproven (no cost figures): "
            + (
                "run CREATE EXTENSION hypopg."
                if hypopg == "available"
                else "install it (Debian: apt-get install postgresql-15-hypopg, for your server's "
                "version) and run CREATE EXTENSION hypopg."
            )
        )
    by_candidate: dict[Candidate, Suggestion] = {}
    for item in _work(statements, slow, planning == "null"):
        try:
            top = plan(using, item.sql, item.params, item.planning)
        except Exception as error:  # a statement that no longer plans (a dropped table...)
            advice.notes.append(f"could not plan {item.sql[:80]!r}: {error}")
            continue
        before = float(top["Total Cost"])
        options = candidates(using, item.sql, top)
        if not advice.proven:
            for candidate in options[:1]:
                planned = Planned(
                    item.sql, item.planning, before, before, item.queryid, item.total_ms, item.mean_ms
                )
                by_candidate.setdefault(candidate, Suggestion(candidate)).statements.append(planned)
            continue
        best: tuple[float, int, Candidate] | None = None
        for candidate in options:
            cost, size = _hypothetical_cost(using, candidate, item.sql, item.params, item.planning)
            if best is None or cost < best[0]:
                best = (cost, size, candidate)
        after = best[0] if best else before
        planned = Planned(item.sql, item.planning, before, after, item.queryid, item.total_ms, item.mean_ms)
        if best is None or planned.cut < MIN_COST_CUT:
            advice.rejected.append((planned, best[2] if best else None))
            continue
        suggestion = by_candidate.setdefault(best[2], Suggestion(best[2], size_bytes=best[1]))
        suggestion.statements.append(planned)
    for suggestion in by_candidate.values():
        suggestion.writes, suggestion.live_rows, suggestion.existing_indexes = table_writes(
            using, suggestion.candidate.table
        )
    advice.suggestions = sorted(by_candidate.values(), key=lambda s: -sum(p.total_ms for p in s.statements))
    return advice
