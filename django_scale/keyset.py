"""The one keyset ("after") filter: the rows that come after a given row in an ordering.

Reading page *n* with ``OFFSET`` reads and throws away every row before it; reading the rows
"after the last row of the previous page" is an index range scan at any depth, and does not
shift when rows are inserted or deleted meanwhile. The admin's next links, the paginator and
:func:`~django_scale.bulk.iter_batches` all page this way, through this module.

* **Ordering fields**: plain concrete, non-relation fields of the model itself (``"name"``,
  ``"-published"``, ``"pk"``); an ordering through a relation, an expression or ``"?"`` has
  no keyset and :func:`ordering_keys` returns ``None`` (page with an ``OFFSET`` instead).
* **Descending**: each field keeps its own direction; with one direction throughout the
  condition is a row comparison, ``(a, b) > (x, y)``, which PostgreSQL serves as one index
  range, otherwise the same condition spelled out with ``OR``.
* **NULLs** sort where the database puts them (``DatabaseFeatures.nulls_order_largest``:
  last ascending on PostgreSQL, first on SQLite), and the condition follows: after a ``NULL``
  come only the other ``NULL`` rows (on the next keys) and, where ``NULL`` is smallest, every
  value.
* **Ties by the primary key**: a keyset needs a total order, or rows that tie on every key
  are skipped or repeated. :func:`ordering_keys` adds the primary key when no key is unique
  and non-null, as Django's admin does for its changelist; :func:`order_by_keys` orders a
  queryset by the keys it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from django.core.exceptions import FieldDoesNotExist
from django.db import connections, models
from django.db.models import Model, Q, QuerySet
from django.db.models.expressions import RawSQL

from django_scale.exceptions import ArgumentError

__all__ = ["Key", "after", "order_by_keys", "ordering_keys", "rows_after", "values_of"]

M = TypeVar("M", bound=Model)


@dataclass(frozen=True)
class Key:
    """One field of a keyset ordering, with its direction."""

    #: The model field (concrete, of the model itself, not a relation).
    field: Any
    #: Whether the ordering runs from the largest value down.
    descending: bool = False

    @property
    def name(self) -> str:
        """The field's name, as ``filter()`` and ``order_by()`` take it."""
        return str(self.field.name)

    @property
    def ordering(self) -> str:
        """The ``order_by()`` term for this key (``"-name"`` when descending)."""
        return f"-{self.name}" if self.descending else self.name

    @property
    def unique(self) -> bool:
        """Whether no two rows share this key's value (unique and never ``NULL``)."""
        return bool(self.field.primary_key or (self.field.unique and not self.field.null))


def _key_of(model: type[Model], term: Any) -> Key | None:
    if not isinstance(term, str) or "__" in term or "?" in term:
        return None
    descending, name = term.startswith("-"), term.lstrip("-")
    try:
        field = model._meta.pk if name == "pk" else model._meta.get_field(name)
    except FieldDoesNotExist:
        return None
    if field is None or not getattr(field, "concrete", False) or field.is_relation:
        return None
    return Key(field, descending)


def ordering_keys(queryset: QuerySet[Any], *, nullable: bool = True) -> list[Key] | None:
    """Return the keys of *queryset*'s explicit ordering, or ``None`` if it has no keyset.

    The primary key is appended, ascending, when no key is unique, so that ties are broken
    the same way on every page. With ``nullable=False`` an ordering by a field that allows
    ``NULL`` has no keyset either.
    """
    model = queryset.model
    keys = []
    for term in queryset.query.order_by:
        key = _key_of(model, term)
        if key is None or (key.field.null and not nullable):
            return None
        keys.append(key)
    if not keys:
        return None
    if not any(key.unique for key in keys):
        keys.append(Key(model._meta.pk))
    return keys


def order_by_keys(queryset: QuerySet[M], keys: Sequence[Key]) -> QuerySet[M]:
    """Return *queryset* ordered by *keys* (its own ordering replaced)."""
    return queryset.order_by(*(key.ordering for key in keys))


def values_of(keys: Sequence[Key], row: Any) -> list[Any]:
    """Return the values of *keys* in *row*, a model instance or a ``values()`` dict."""
    if isinstance(row, dict):
        return [row[key.name] for key in keys]
    return [getattr(row, key.field.attname) for key in keys]


def after(keys: Sequence[Key], values: Sequence[Any], *, using: str) -> Q | RawSQL:
    """Return the condition that keeps the rows after *values* in the ordering *keys*.

    *values* are the keys' values in the last row already seen, as Python values or as the
    strings ``Field.value_to_string()`` gives (they go through ``Field.to_python()``, which
    raises :class:`~django.core.exceptions.ValidationError` for a malformed one). *using*
    is the alias of the database that runs the query: where it sorts ``NULL`` and how it
    quotes names.
    """
    if len(keys) != len(values):
        raise ArgumentError(f"after() needs one value per key: {len(keys)} keys, {len(values)} values.")
    values = [
        None if value is None else key.field.to_python(value) for key, value in zip(keys, values, strict=True)
    ]
    connection = connections[using]
    directions = {key.descending for key in keys}
    if len(keys) > 1 and len(directions) == 1 and not any(key.field.null for key in keys):
        quote = connection.ops.quote_name
        # Each column qualified by its own model's table: a field inherited from a parent
        # model (multi-table inheritance) is a column of the parent's table.
        columns = ", ".join(
            f"{quote(key.field.model._meta.db_table)}.{quote(key.field.column)}" for key in keys
        )
        placeholders = ", ".join(["%s"] * len(values))
        operator = "<" if directions == {True} else ">"
        # Raw SQL parameters skip the fields' own conversion: apply it (SQLite keeps
        # datetimes as text in its own format, for one).
        params = [
            key.field.get_db_prep_value(value, connection) for key, value in zip(keys, values, strict=True)
        ]
        return RawSQL(f"({columns}) {operator} ({placeholders})", params, output_field=models.BooleanField())
    nulls_largest = bool(connection.features.nulls_order_largest)
    condition: Q | None = None
    equal = Q()
    for key, value in zip(keys, values, strict=True):
        beyond = _beyond(key, value, nulls_largest)
        if beyond is not None:
            condition = equal & beyond if condition is None else condition | (equal & beyond)
        equal &= Q(**{f"{key.name}__isnull": True}) if value is None else Q(**{key.name: value})
    # Past the last row of the ordering: no row at all.
    return Q(pk__in=[]) if condition is None else condition


def _beyond(key: Key, value: Any, nulls_largest: bool) -> Q | None:
    """The rows whose *key* comes strictly after *value* in *key*'s direction (``None``: none)."""
    # Ascending with NULL largest, or descending with NULL smallest: NULLs come last.
    nulls_last = nulls_largest != key.descending
    if value is None:
        # After a NULL: nothing when NULLs come last, every value when they come first.
        return None if nulls_last else Q(**{f"{key.name}__isnull": False})
    beyond = Q(**{f"{key.name}__{'lt' if key.descending else 'gt'}": value})
    if key.field.null and nulls_last:
        beyond |= Q(**{f"{key.name}__isnull": True})
    return beyond


def rows_after(queryset: QuerySet[M], keys: Sequence[Key], values: Sequence[Any] | None) -> QuerySet[M]:
    """Return *queryset* ordered by *keys*, from the row after *values* (all rows for ``None``)."""
    ordered = order_by_keys(queryset, keys)
    if values is None:
        return ordered
    return ordered.filter(after(keys, values, using=queryset.db))
