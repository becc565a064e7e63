"""What a statement reads and writes: table names taken from SQL text, without running it.

The query cache keys invalidation by table, so it needs two answers about a statement:

* :func:`read_tables`: every table a ``SELECT`` may read. Every name after ``FROM`` or
  ``JOIN`` is taken, in the outer query and in subqueries alike. A name that is not a table
  (a set-returning function, the column of ``EXTRACT(year FROM ...)``) costs a needless
  position look-up, never a stale read. What the text does not name (a view, a function that
  reads a table) must be declared with ``.cached(tables=[...])``.
* :func:`written_tables`: the table an ``INSERT``, ``UPDATE``, ``DELETE``, ``MERGE``,
  ``COPY ... FROM`` or ``TRUNCATE`` writes (``WITH`` clauses included), and :data:`EVERY_TABLE`
  for a statement that changes data or schema in a way this cannot name (``ALTER``, ``DROP``,
  a ``SELECT`` of a function declared by the caller with :func:`~django_scale.cache.queries.writes_tables`
  is not seen here: that is why it exists).

Both work on the text Django sends, whose identifiers are quoted (``"app_model"``); unquoted
and schema-qualified names are understood too, and names are compared lower-cased unless quoted.
"""

from __future__ import annotations

import functools
import re

__all__ = ["EVERY_TABLE", "read_tables", "written_tables"]

#: The "table" a statement writes when its targets cannot be named: it invalidates every entry.
EVERY_TABLE = "*"

_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_QUALIFIED = rf"({_NAME}(?:\s*\.\s*{_NAME})?)"
_READ = re.compile(rf"\b(?:FROM|JOIN)\s+(?:ONLY\s+)?{_QUALIFIED}", re.IGNORECASE)
_WRITE = re.compile(
    rf"\b(?:INSERT\s+INTO|UPDATE(?:\s+ONLY)?|DELETE\s+FROM(?:\s+ONLY)?|MERGE\s+INTO|"
    rf"TRUNCATE(?:\s+TABLE)?(?:\s+ONLY)?|COPY|REPLACE\s+INTO)\s+{_QUALIFIED}",
    re.IGNORECASE,
)
_COMMENTS = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
_FIRST_WORD = re.compile(r"\s*\(*\s*([A-Za-z]+)")
#: Statements that never change data.
_READ_ONLY = frozenset(
    {
        "select",
        "show",
        "explain",
        "savepoint",
        "release",
        "rollback",
        "begin",
        "start",
        "commit",
        "end",
        "set",
        "reset",
        "values",
        "fetch",
        "declare",
        "close",
        "move",
        "prepare",
        "deallocate",
        "listen",
        "notify",
        "unlisten",
        "discard",
        "analyze",
        "vacuum",
        "pragma",
        "lock",
        "checkpoint",
    }
)
#: Statements whose target is found by :data:`_WRITE`.
_WRITES = frozenset({"insert", "update", "delete", "merge", "truncate", "copy", "replace", "with"})


def _normalize(name: str) -> str:
    """Return the table part of a possibly schema-qualified, possibly quoted name."""
    parts = re.findall(_NAME, name)
    last = parts[-1] if parts else name
    if last.startswith('"'):
        return last[1:-1].replace('""', '"')
    return last.lower()


@functools.lru_cache(maxsize=4096)
def read_tables(sql: str) -> frozenset[str]:
    """Return the names of the tables the statement *sql* reads (see the module's docstring)."""
    return frozenset(_normalize(match) for match in _READ.findall(_COMMENTS.sub(" ", sql)))


@functools.lru_cache(maxsize=4096)
def written_tables(sql: str) -> frozenset[str]:
    """Return the tables *sql* writes: empty for a read, ``{EVERY_TABLE}`` when they cannot be named."""
    text = _COMMENTS.sub(" ", sql)
    first = _FIRST_WORD.match(text)
    word = first.group(1).lower() if first else ""
    if word in _READ_ONLY:
        return frozenset()
    if word == "copy" and re.search(r"\bTO\s+STDOUT\b", text, re.IGNORECASE):
        return frozenset()  # COPY ... TO reads
    if word in _WRITES:
        found = frozenset(_normalize(match) for match in _WRITE.findall(text))
        if word == "with" and not found:
            return frozenset()  # a WITH ... SELECT
        return found or frozenset({EVERY_TABLE})
    # CREATE, ALTER, DROP, GRANT, CALL, DO, ...: nothing here can name what they change.
    return frozenset({EVERY_TABLE})
