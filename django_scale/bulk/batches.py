"""Keyset-batched iteration over a queryset: :func:`iter_batches`, and :func:`iter_bounds`.

:func:`iter_batches` yields the rows (model instances, ``values()`` dicts, ``values_list()``
tuples or ``flat`` values); :func:`iter_bounds` yields only each batch's key range, for callers
that move the rows themselves (the ``COPY`` pipe, :func:`django_scale.bulk.copy_between`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from django.core.exceptions import FieldDoesNotExist
from django.db.models import Field, Model, QuerySet

from django_scale import keyset
from django_scale.conf import count_problem, seconds_problem
from django_scale.exceptions import ArgumentError, BulkError

__all__ = ["iter_batches", "iter_bounds", "key_field", "selected_names"]

M = TypeVar("M", bound=Model)


def key_field(model: type[Model], key: str) -> Field[Any, Any]:
    """Return *model*'s concrete field named *key* (``"pk"``: the primary key)."""
    try:
        field = model._meta.pk if key == "pk" else model._meta.get_field(key)
    except FieldDoesNotExist as error:
        raise BulkError(f"{model.__name__} has no field {key!r} (the key).") from error
    if not isinstance(field, Field) or not field.concrete:
        raise BulkError(f"{model.__name__}.{key} is not a concrete column; it cannot be a key.")
    return field


def selected_names(queryset: QuerySet[Any]) -> list[str]:
    """Return the names of a ``values()``/``values_list()`` queryset's columns, in row order.

    The same order Django's own ``ValuesIterable`` zips a row with (django/db/models/query.py):
    ``Query.selected`` from Django 5.2 on (ticket #28900), before that the ``extra()`` columns,
    then the fields, then the annotations. Pinned by tests/test_copy_pipe.py
    (``test_selected_names_match_the_rows``).
    """
    query = queryset.query
    selected = getattr(query, "selected", None)
    if selected:
        return list(selected)
    return [*query.extra_select, *query.values_select, *query.annotation_select]


def _check_shape(queryset: QuerySet[Any], key: str) -> None:
    """Raise :class:`ArgumentError` (a ``ValueError``) for a queryset keyset batches cannot walk."""
    query = queryset.query
    if query.is_sliced:
        raise ArgumentError(
            "iter_batches() cannot batch a sliced queryset (it adds its own WHERE and LIMIT); "
            "filter instead of slicing, or slice the batches."
        )
    if query.combinator:
        raise ArgumentError(
            f"iter_batches() cannot batch a {query.combinator}() queryset: it cannot be filtered "
            "by key. Batch each part, or filter with Q objects instead."
        )
    if query.distinct_fields:
        raise ArgumentError(
            f"iter_batches() cannot batch distinct({', '.join(query.distinct_fields)}): DISTINCT ON must "
            f"follow the ordering, and batches are ordered by the key {key!r}."
        )


def _key_reader(queryset: QuerySet[Any], field: Field[Any, Any], key: str, row: Any) -> Any:
    """Return a function reading the key from rows shaped like *row*; :class:`ArgumentError` if none can."""
    model = queryset.model
    name = field.name
    attname = cast(str, getattr(field, "attname", name))
    accepted = {name, attname} | ({"pk"} if field.primary_key else set())
    if isinstance(row, Model):
        return lambda item: getattr(item, attname)
    if isinstance(row, dict):
        found = next((n for n in (name, attname, "pk") if n in accepted and n in row), None)
        if found is None:
            raise ArgumentError(
                f"iter_batches() over values({', '.join(map(repr, row))}) needs the key "
                f"{model.__name__}.{name} among the values: add {name!r}."
            )
        return lambda item: item[found]
    names = selected_names(queryset)
    if isinstance(row, tuple):
        index = next((n for n, column in enumerate(names) if column in accepted), None)
        if index is None or len(row) != len(names):
            raise ArgumentError(
                f"iter_batches() over values_list({', '.join(map(repr, names))}) needs the key "
                f"{model.__name__}.{name} among the columns: add {name!r} "
                f"(e.g. values_list({name!r}, ...)), and read it from each tuple."
            )
        return lambda item: item[index]
    # values_list(flat=True): the one column must be the key.
    if len(names) != 1 or names[0] not in accepted:
        raise ArgumentError(
            f"iter_batches() over values_list({', '.join(map(repr, names))}, flat=True) needs the "
            f"flat column to be the key {model.__name__}.{name}; use values_list({name!r}, "
            f"{', '.join(map(repr, names))}) without flat."
        )
    return lambda item: item


def iter_bounds(
    queryset: QuerySet[Any], size: int = 1000, *, key: str = "pk", start_after: Any = None
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(after, upto)`` key ranges of about *size* rows of *queryset*, in key order.

    The rows of a batch are those with ``after < key <= upto`` (``after`` ``None``: from the
    first). Each bound is one index-only query (``ORDER BY key
    OFFSET size - 1 LIMIT 1``); the rows themselves are left to the caller. Same guarantees as
    :func:`iter_batches`: a row that exists throughout is in exactly one range.
    """
    problem = count_problem(size)
    if problem is not None:
        raise BulkError(f"size {problem.removeprefix('it ')}, not {size!r}.")
    model = queryset.model
    field = _unique_key(model, key)
    _check_shape(queryset, key)
    keys = queryset.values_list(field.name, flat=True).order_by(field.name)
    last = start_after
    while True:
        page = keys if last is None else keys.filter(keyset.after([keyset.Key(field)], [last], using=keys.db))
        upto = next(iter(page[size - 1 : size]), None)
        if upto is None:
            # The last range: up to the largest key now, so every range is closed (a checkpoint
            # after it holds a key). Rows added beyond it meanwhile were not there throughout.
            upto = next(iter(page.order_by(f"-{field.name}")[:1]), None)
            if upto is not None:
                yield last, upto
            return
        yield last, upto
        last = upto


def _unique_key(model: type[Model], key: str) -> Field[Any, Any]:
    field = key_field(model, key)
    if not (field.primary_key or field.unique):
        raise BulkError(
            f"iter_batches() needs a unique key; {model.__name__}.{key} is not unique. "
            "Pass key= the primary key or a unique field."
        )
    return field


def iter_batches(
    queryset: QuerySet[M],
    size: int = 1000,
    *,
    key: str = "pk",
    start_after: Any = None,
    target_seconds: float | None = None,
    min_size: int = 10,
    max_size: int = 100_000,
) -> Iterator[list[M]]:
    """Yield *queryset*'s rows in lists of about *size*, ordered by the unique field *key*.

    Each batch is one query, ``WHERE key > <last key of the previous batch> ORDER BY key
    LIMIT size``: an index range scan, whatever the depth, and outside ``atomic()`` each batch
    is its own short transaction. Rows are never seen twice and none that exist throughout is
    skipped, however rows are inserted, updated or deleted meanwhile (an ``OFFSET`` shifts).
    The queryset's own ordering is replaced by *key*'s.

    *queryset* may be a ``values()`` or ``values_list()`` queryset (the fast way to transform
    rows in Python): its rows must hold the key (``values_list("id", "name")``;
    ``values_list("id", flat=True)``). A shape that cannot be batched raises
    :class:`~django_scale.exceptions.ArgumentError`, a ``ValueError``, naming the fix: rows
    without the key, a sliced or ``union()`` queryset, ``distinct(*fields)``.

    With *target_seconds*, the batch size adapts so that fetching and processing a batch (the
    time until the next batch is asked for) takes about that long, between *min_size* and
    *max_size*. *start_after* resumes after a key value.
    """
    problem = count_problem(size)
    if problem is not None:
        raise BulkError(f"size {problem.removeprefix('it ')}, not {size!r}.")
    problem = None if target_seconds is None else seconds_problem(target_seconds)
    if problem is not None:
        raise BulkError(f"target_seconds {problem.removeprefix('it ')} (or None), not {target_seconds!r}.")
    model = queryset.model
    field = _unique_key(model, key)
    _check_shape(queryset, key)
    name = field.name
    ordered = queryset.order_by(name)
    last = start_after
    read_key: Callable[[Any], Any] | None = None
    while True:
        page = (
            ordered
            if last is None
            else ordered.filter(keyset.after([keyset.Key(field)], [last], using=ordered.db))
        )
        batch = list(page[:size])
        if not batch:
            return
        if read_key is None:
            read_key = _key_reader(queryset, field, key, batch[0])
        started = time.monotonic()
        yield batch
        elapsed = time.monotonic() - started
        last = read_key(batch[-1])
        if last is None:
            # Rows sharing a NULL key have no order to resume from: a batch ending among them
            # would skip the rest.
            raise BulkError(
                f"{model.__name__}.{key} is NULL in a row; iter_batches() needs a key without NULLs."
            )
        if len(batch) < size:
            return
        if target_seconds is not None:
            # Multiplicative steps, at most doubling or halving, toward the time target.
            factor = min(2.0, max(0.5, target_seconds / max(elapsed, 1e-6)))
            size = max(min_size, min(max_size, int(size * factor)))
