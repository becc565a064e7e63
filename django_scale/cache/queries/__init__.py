"""The query cache: ``ScaleQuerySet.cached()``, invalidated by WAL positions instead of clocks.

An entry is a query's rows, keyed by its SQL, parameters, database alias, model, result type
and Django version. It records the WAL position its rows were read at; every table it reads
has a write position in the shared store, moved forward on each commit that writes the table
(by this process or any other). An entry is served only while it was read at or after every
one of its tables' last writes: no clocks, no lists of keys to delete, replica lag handled by
construction (an entry read on a lagging standby is older than the write, so it misses).

The parts: :mod:`~django_scale.cache.queries.sql` (the tables a statement reads or writes),
:mod:`~django_scale.cache.queries.positions` (read and write positions on PostgreSQL),
:mod:`~django_scale.cache.queries.shared` (the keys in Redis), :mod:`~django_scale.cache.queries.writes`
(the execute wrapper that sees writes and publishes them on commit) and
:mod:`~django_scale.cache.queries.reads` (the read path), with
:mod:`~django_scale.cache.queries.compiled` (a query's SQL, compiled once per process) and
:mod:`~django_scale.cache.queries.rows` (a model query's rows stored as values). It works on PostgreSQL with a
django-redis cache; anywhere else ``.cached()`` runs the query uncached (SQLite has no WAL
position that processes can compare, and the cache must be shared by every writer).
"""

from __future__ import annotations

from django_scale.cache.queries.reads import CacheOptions, fetch_rows
from django_scale.cache.queries.writes import reset, track_writes, writes_tables

__all__ = ["CacheOptions", "fetch_rows", "reset", "track_writes", "writes_tables"]
