"""How an entry holds its rows: a model query's column values, built into instances on each read.

Pickling model instances is most of what storing them costs: Django's ``Model.__reduce__``
copies each instance's ``__dict__`` and its ``ModelState``, and unpickling runs
``Model.__setstate__`` per instance. So a queryset whose instances Django's ``ModelIterable``
builds from its own model's columns and annotations alone (:func:`by_values`) is stored as
the rows its SQL compiler returned (the database converters applied), in the ``SELECT``'s
order, and every read builds the instances as ``ModelIterable`` does
(django/db/models/query.py, ``ModelIterable.__iter__``): ``Model.from_db(db, field_names,
values)``, the documented way to load an instance (so a model's own ``from_db()`` runs, and
the ``pre_init``/``post_init`` signals, as without the cache), then each annotation (and
``extra(select=...)`` column) set as an attribute, and for a related manager's queryset
(``reporter.posts.all()``) the instance it was made from set on each row, as Django does (its
known related objects; Django 6.1's check that the key is not deferred included). Deferred
fields (``only()``, ``defer()``) are deferred again: ``from_db()`` is given the loaded
fields' names.

Where the values are (the ``SELECT``'s positions) is read from the compiler that compiled the
query for the entry's key, after ``as_sql()``: its ``select``, ``klass_info`` and
``annotation_col_map``, the attributes ``ModelIterable`` reads after running the query (not
documented API; ``tests/test_querycache_rows.py`` pins them). A miss builds its instances from
the rows it stores, exactly as a hit builds them. When the key's compiler compiled the query
just now (not from the memo), the miss runs that compiler's SQL itself (:func:`run`) rather
than have Django compile the query a second time.

Everything else keeps its rows pickled as the queryset returns them: ``values()`` and
``values_list()`` (already plain data), ``select_related()`` (instances of other models in
each row), a custom iterable class, and on Django 6.1 a fetch mode other than the default ``FETCH_ONE``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from django.db import connections
from django.db.models.query import ModelIterable

from django_scale.prefetch.peers import HAS_FETCH_MODES

__all__ = ["Shape", "build", "by_values", "reader", "run", "shape_of"]


def _default_fetch_mode() -> Any:
    from django.db.models import FETCH_ONE  # type: ignore[attr-defined,unused-ignore]

    return FETCH_ONE


#: Django 6.1's default fetch mode (``None`` before 6.1).
FETCH_ONE: Any = _default_fetch_mode() if HAS_FETCH_MODES else None


class Shape(NamedTuple):
    """Where a model query's values are in each row of its ``SELECT``."""

    model: type[Any]
    #: The attribute names of the model's loaded fields, in the order of their columns.
    names: tuple[str, ...]
    #: The model's columns are ``row[start:end]``.
    start: int
    end: int
    #: ``(attribute, position)`` of each annotation and ``extra(select=...)`` column.
    annotations: tuple[tuple[str, int], ...]


def shape_of(compiler: Any) -> Shape | None:
    """The :class:`Shape` of the rows *compiler* returns (after its ``as_sql()``), or ``None``
    when they hold more than one model's columns (``select_related()``)."""
    klass_info = getattr(compiler, "klass_info", None)
    if not klass_info or klass_info.get("related_klass_infos"):
        return None
    try:
        fields = klass_info["select_fields"]
        start, end = fields[0], fields[-1] + 1
        names = tuple(column[0].target.attname for column in compiler.select[start:end])
        annotations = tuple(compiler.annotation_col_map.items())
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return Shape(klass_info["model"], names, start, end, annotations)


def by_values(queryset: Any) -> bool:
    """Whether *queryset*'s rows are stored as values (see the module docstring)."""
    if queryset._iterable_class is not ModelIterable or queryset.query.select_related:
        return False
    return not HAS_FETCH_MODES or queryset._fetch_mode is FETCH_ONE


def build(
    shape: Shape, db: str, rows: Sequence[Sequence[Any]], known: Mapping[Any, Mapping[Any, Any]]
) -> list[Any]:
    """Return the instances of *rows* (stored values), as ``ModelIterable`` builds them;
    *known* is the queryset's ``_known_related_objects`` (a related manager's instance)."""
    model = shape.model
    from_db = model.from_db
    names = list(shape.names)
    start, end, annotations = shape.start, shape.end, shape.annotations
    related = []
    for field, objects in known.items():
        attnames = [
            field.attname if name == "self" else model._meta.get_field(name).attname
            for name in field.from_fields
        ]
        related.append((field, objects, attnames, operator.attrgetter(*attnames)))
    instances = []
    for row in rows:
        instance = from_db(db, names, row[start:end])
        for name, position in annotations:
            setattr(instance, name, row[position])
        for field, objects, attnames, key in related:
            if field.is_cached(instance) or any(name not in instance.__dict__ for name in attnames):
                continue
            found = objects.get(key(instance))
            if found is not None:
                setattr(instance, field.name, found)
        instances.append(instance)
    return instances


def reader(shape: Shape, db: str) -> Callable[[Any], tuple[list[Any], list[Any]]]:
    """Return how a miss reads *shape*'s rows: ``(values to store, instances)`` of a queryset."""

    def read(queryset: Any) -> tuple[list[Any], list[Any]]:
        compiler = queryset.query.get_compiler(using=db)
        values = list(compiler.results_iter(tuple_expected=True))
        return values, build(shape, db, values, queryset._known_related_objects)

    return read


def run(
    shape: Shape,
    db: str,
    known: Mapping[Any, Mapping[Any, Any]],
    compiler: Any,
    sql: str,
    params: Sequence[Any],
) -> tuple[list[Any], list[Any]]:
    """Run *sql*, which *compiler* has just compiled (``as_sql()``), and return ``(values to
    store, instances)`` as :func:`reader` does, without compiling it again.

    This is ``compiler.execute_sql()`` for a list of rows (django/db/models/sql/compiler.py,
    ``SQLCompiler.execute_sql`` with ``MULTI``, and ``cursor_iter``: the cursor's rows, cut to
    ``col_count`` when ordering added columns, ``has_extra_select``) without its ``as_sql()``;
    ``results_iter(results)`` then applies the converters, as ``ModelIterable`` has it do.
    """
    with connections[db].cursor() as cursor:
        cursor.execute(sql, params)
        fetched = cursor.fetchall()
    if compiler.has_extra_select:
        count = compiler.col_count
        fetched = [row[:count] for row in fetched]
    values = list(compiler.results_iter(results=[fetched], tuple_expected=True))
    return values, build(shape, db, values, known)
