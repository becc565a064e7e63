"""The SQL of a cached query, compiled once per query in this process.

An entry's key needs the query's SQL and parameters, and compiling them
(``query.get_compiler(using).as_sql()``) is most of what a hit costs besides the ``MGET``:
for a short page query, more than the Redis round trip. A query is compiled again for every
queryset, though most querysets of a site are the same few queries built again per request.

So the compiled SQL is remembered per *pickled query*. Django documents pickling
``queryset.query`` (without evaluating the queryset) to re-create a queryset later: the pickle
holds everything the query is made of (its model and fields by reference, its filters, values,
annotations, ordering, subqueries), and pickling it costs a fraction of compiling it. Two
queries with the same pickle compile to the same SQL as long as nothing outside the query that
the compiler reads changed: the database alias (its backend and features) and the time zones
Django's expressions read when they are compiled (``USE_TZ``, ``TIME_ZONE``, the connection's
``timezone_name`` and the *current* time zone, which ``timezone.activate()`` sets per request
and ``TruncDate`` and the other date functions put in their SQL) are part of the memo's key,
and so is the active language (``translation.activate()``, per request), which translation
packages' expressions read when compiled. Django's version and the models cannot change in a
running process. An expression of the project's own whose ``as_sql()`` reads other state (a
context variable of its own) must not be used in a cached query: its SQL would be the one
compiled first (see docs/querycache.md).

Only the *lookup* is memoised: the entry's key is still made of the SQL text and parameters
(the pickle of equal queries can differ between processes, whose set order differs), so every
process shares the same entries. A pickle that differs (a new value in a filter) compiles and
is remembered, at most :data:`SIZE` queries. A query that cannot be pickled, whose pickle is
longer than :data:`LARGEST`, or whose compiler raises (``EmptyResultSet``), is compiled every
time.

With the SQL the memo keeps what else a read derives from the query alone: where a model
query's values are in its rows (:func:`~django_scale.cache.queries.rows.shape_of`, read from
the same compiler) and, per set of ``cached()`` options, the entry's key and tables
(:attr:`Compiled.keys`, filled by :mod:`~django_scale.cache.queries.reads`), so that a hit
builds neither the key's JSON nor its digest again.
"""

from __future__ import annotations

import pickle
import threading
from collections import OrderedDict
from typing import Any

from django.conf import settings
from django.db import connections
from django.utils import timezone, translation

from django_scale.cache.queries.rows import Shape, shape_of

__all__ = ["LARGEST", "SIZE", "Compiled", "compile_for_run", "compile_query", "forget"]

#: The most queries remembered per process (the least recently used is forgotten first: a
#: query that never pickles alike, as one with a ``Value()`` whose output field is a new field
#: object each time, passes through without pushing out the queries in use).
SIZE = 512
#: The largest pickled query remembered (bytes): a query with a long ``__in`` list is compiled
#: every time, so the memo stays within ``SIZE * LARGEST``.
LARGEST = 16384


class Compiled:
    """A query compiled for one database alias: its SQL and what reads derive from it."""

    __slots__ = ("keys", "params", "shape", "sql")

    def __init__(self, sql: str, params: tuple[Any, ...], shape: Shape | None) -> None:
        self.sql = sql
        self.params = params
        #: Where a model query's values are in its rows (``None``: more than one model's).
        self.shape = shape
        #: Per ``cached()`` options: the entry's key and tables (see :mod:`~django_scale.cache.queries.reads`).
        self.keys: dict[tuple[Any, ...], tuple[str, tuple[str, ...]]] = {}


_memo: OrderedDict[tuple[Any, ...], Compiled] = OrderedDict()
_lock = threading.Lock()


def _compile(query: Any, using: str) -> tuple[Compiled, Any]:
    compiler = query.get_compiler(using=using)
    sql, params = compiler.as_sql()
    return Compiled(sql, tuple(params), shape_of(compiler)), compiler


def compile_query(query: Any, using: str) -> Compiled:
    """Return *query* compiled (``query.get_compiler(using).as_sql()``), from the memo when it
    was compiled before in this process (see the module docstring). Raise what the compiler raises."""
    return compile_for_run(query, using)[0]


def compile_for_run(query: Any, using: str) -> tuple[Compiled, Any]:
    """Return :func:`compile_query`'s answer and the compiler that compiled it now, or ``None``
    when it came from the memo: a miss runs that compiler's SQL without compiling it again
    (:func:`~django_scale.cache.queries.rows.run`)."""
    connection = connections[using]
    try:
        # Before compiling: compiling sets up the query's aliases, which changes its pickle.
        pickled = pickle.dumps(query, pickle.HIGHEST_PROTOCOL)
    except Exception:
        pickled = b""
    if not pickled or len(pickled) > LARGEST:
        return _compile(query, using)
    zone = timezone.get_current_timezone_name() if settings.USE_TZ else ""
    language = translation.get_language() if settings.USE_I18N else ""
    key = (using, settings.USE_TZ, settings.TIME_ZONE, connection.timezone_name, zone, language, pickled)
    with _lock:
        found = _memo.get(key)
        if found is not None:
            _memo.move_to_end(key)
            return found, None
    compiled, compiler = _compile(query, using)
    with _lock:
        _memo[key] = compiled
        if len(_memo) > SIZE:
            _memo.popitem(last=False)
    return compiled, compiler


def forget() -> None:
    """Forget every compiled query (for tests)."""
    with _lock:
        _memo.clear()
