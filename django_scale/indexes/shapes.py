"""What B-tree indexes a model declares, read from its options alone (no database).

Every way Django creates an index ends up here as one :class:`IndexShape`: the primary key,
``unique``, ``db_index``, a foreign key's automatic index, ``Meta.indexes``,
``unique_together`` and ``UniqueConstraint``. Checks and the advisor ask
:func:`serving_index` whether some plain B-tree index serves an equality filter followed by
an ordering, which is what a changelist with a filter runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db.models import Index, Model, UniqueConstraint

__all__ = ["IndexShape", "index_shapes", "ordering_columns", "serving_index", "suggest_index"]

#: Index class names of access methods other than a B-tree (``Index`` itself is a B-tree).
#: By name, so that this module needs no ``django.contrib.postgres`` (and so no driver).
NOT_BTREE = {"BloomIndex", "BrinIndex", "GinIndex", "GistIndex", "HashIndex", "SpGistIndex", "TrigramIndex"}

#: Django's limit on an index name (``Index.max_name_length``).
MAX_NAME_LENGTH = 30


@dataclass(frozen=True)
class IndexShape:
    """One index a model's options declare."""

    #: The fields, in order, each ``(name, descending)``.
    columns: tuple[tuple[str, bool], ...]
    #: Whether it also enforces uniqueness (so it cannot simply be dropped).
    unique: bool
    #: Where it is declared, for messages: ``"Meta.indexes 'news_article_latest'"``.
    source: str
    #: Whether it is a plain B-tree of the columns: no condition, expression, opclass or INCLUDE.
    plain: bool = True
    #: Whether it is the automatic index of a foreign key.
    foreign_key: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(name for name, _ in self.columns)

    def starts_with(self, other: IndexShape) -> bool:
        """Whether *other*'s columns are a prefix of this one's, in the same directions (or all reversed)."""
        if len(other.columns) > len(self.columns):
            return False
        head = self.columns[: len(other.columns)]
        return head == other.columns or head == tuple((n, not d) for n, d in other.columns)


def _field_name(model: type[Model], name: str) -> str | None:
    """The concrete field *name* (or ``pk``, or a column's attname) names, else ``None``."""
    opts = model._meta
    if name == "pk":
        return opts.pk.name if opts.pk else None
    for field in opts.concrete_fields:
        if name in (field.name, field.attname):
            return str(field.name)
    return None


def _columns(model: type[Model], fields: Sequence[str]) -> tuple[tuple[str, bool], ...] | None:
    columns = []
    for entry in fields:
        name = _field_name(model, entry.lstrip("-"))
        if name is None:
            return None
        columns.append((name, entry.startswith("-")))
    return tuple(columns)


def index_shapes(model: type[Model]) -> list[IndexShape]:
    """Return every index *model*'s options declare, in declaration order."""
    opts = model._meta
    shapes: list[IndexShape] = []
    for field in opts.concrete_fields:
        if field.primary_key:
            shapes.append(IndexShape(((field.name, False),), True, f"primary key {field.name!r}"))
        elif field.unique:
            shapes.append(IndexShape(((field.name, False),), True, f"unique field {field.name!r}"))
        elif getattr(field, "db_index", False):
            foreign_key = bool(field.many_to_one)
            source = f"foreign key {field.name!r}" if foreign_key else f"db_index on {field.name!r}"
            shapes.append(IndexShape(((field.name, False),), False, source, foreign_key=foreign_key))
    for together in opts.unique_together:
        columns = _columns(model, together)
        if columns:
            shapes.append(IndexShape(columns, True, f"unique_together {tuple(together)!r}"))
    for constraint in opts.constraints:
        if isinstance(constraint, UniqueConstraint) and constraint.fields:
            columns = _columns(model, constraint.fields)
            if columns:
                plain = not (
                    constraint.condition
                    or constraint.expressions
                    or getattr(constraint, "include", None)
                    or getattr(constraint, "opclasses", None)
                    or constraint.deferrable
                )
                shapes.append(IndexShape(columns, True, f"UniqueConstraint {constraint.name!r}", plain=plain))
    for index in opts.indexes:
        if not index.fields or not isinstance(index, Index):
            continue
        columns = _columns(model, index.fields)
        if columns is None:
            continue
        plain = type(index).__name__ not in NOT_BTREE and not (
            index.condition or index.include or index.opclasses or getattr(index, "expressions", ())
        )
        shapes.append(IndexShape(columns, False, f"Meta.indexes {index.name!r}", plain=plain))
    return shapes


def ordering_columns(model: type[Model], ordering: Sequence[Any]) -> tuple[tuple[str, bool], ...] | None:
    """Return *ordering* as ``(field, descending)`` pairs, or ``None`` when no index of the
    model's own table can serve it (random order, a related model's field, an expression)."""
    if not all(isinstance(entry, str) for entry in ordering):
        return None
    if any(entry == "?" or "__" in entry for entry in ordering):
        return None
    return _columns(model, [entry.lstrip("+") for entry in ordering])


def serving_index(
    model: type[Model],
    equal: Sequence[str] = (),
    order: Sequence[tuple[str, bool]] = (),
    *,
    shapes: Sequence[IndexShape] | None = None,
) -> IndexShape | None:
    """Return a plain B-tree index of *model* that serves ``WHERE <equal> = ... ORDER BY <order>``.

    It leads with the *equal* columns (in any order), then the *order* columns in their
    directions or all reversed (a B-tree is read backwards as well). With no *order*, an index
    leading with *equal* serves. Return ``None`` when none does.
    """
    wanted = set(equal)
    for shape in index_shapes(model) if shapes is None else shapes:
        if not shape.plain or len(shape.columns) < len(equal) + len(order):
            continue
        if set(shape.names[: len(equal)]) != wanted or len(wanted) != len(equal):
            continue
        rest = shape.columns[len(equal) : len(equal) + len(order)]
        if rest == tuple(order) or rest == tuple((n, not d) for n, d in order):
            return shape
    return None


def suggest_index(model: type[Model], fields: Sequence[str]) -> str:
    """Return the ``models.Index(...)`` declaration, ready to paste into ``Meta.indexes``."""
    bare = "_".join(field.lstrip("-") for field in fields)
    name = f"{model._meta.db_table}_{bare}"
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_LENGTH - 9].rstrip('_')}_{digest}"
    if not name[0].isalpha():
        name = f"i{name[: MAX_NAME_LENGTH - 1]}"
    return f"models.Index(fields={list(fields)!r}, name={name!r})"
