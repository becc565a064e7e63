"""Keyset-batched iteration over a queryset: :func:`iter_batches`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar, cast

from django.core.exceptions import FieldDoesNotExist
from django.db.models import Field, Model, QuerySet

from django_scale import keyset
from django_scale.conf import count_problem, seconds_problem
from django_scale.exceptions import BulkError

__all__ = ["iter_batches", "key_field"]

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
    field = key_field(model, key)
    if not (field.primary_key or field.unique):
        raise BulkError(
            f"iter_batches() needs a unique key; {model.__name__}.{key} is not unique. "
            "Pass key= the primary key or a unique field."
        )
    name = field.name
    attname = cast(str, getattr(field, "attname", name))
    ordered = queryset.order_by(name)
    last = start_after
    while True:
        page = (
            ordered
            if last is None
            else ordered.filter(keyset.after([keyset.Key(field)], [last], using=ordered.db))
        )
        batch = list(page[:size])
        if not batch:
            return
        started = time.monotonic()
        yield batch
        elapsed = time.monotonic() - started
        tail = batch[-1]
        last = tail[name] if isinstance(tail, dict) else getattr(tail, attname)
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
