"""``ScaleModelAdminChecks``: Django's admin checks plus those for options slow on big tables (3xx)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.checks import ModelAdminChecks
from django.contrib.admin.filters import AllValuesFieldListFilter
from django.contrib.postgres.indexes import (
    BloomIndex,
    BrinIndex,
    GinIndex,
    GistIndex,
    HashIndex,
    OpClass,
    SpGistIndex,
)
from django.core import checks
from django.core.checks import CheckMessage
from django.db.models import F, Index, Model
from django.db.models.functions import Cast, Upper

from django_scale.admin.filters import ScaleAllValuesFieldListFilter
from django_scale.checks import _message
from django_scale.indexes import TrigramIndex
from django_scale.indexes.checks import check_admin_indexes

__all__ = ["ScaleModelAdminChecks"]

#: Index classes of other access methods than a B-tree (``Index`` itself is a B-tree).
NOT_BTREE_INDEXES = (BloomIndex, BrinIndex, GinIndex, GistIndex, HashIndex, SpGistIndex)


#: Filter classes that list their choices with a SELECT DISTINCT over the whole table.
DISTINCT_FILTERS = (AllValuesFieldListFilter, admin.RelatedOnlyFieldListFilter)
#: Search lookups a B-tree index cannot serve: they need a trigram (GIN/GiST) index.
SUBSTRING_LOOKUPS = ("icontains", "contains", "iregex", "regex", "iendswith", "endswith", "iexact")
#: Lookups PostgreSQL runs as ``UPPER(column) LIKE UPPER(...)`` (or ``=``).
UPPER_LOOKUPS = ("icontains", "iendswith", "iexact")


def _w301_full_result_count(obj: Any) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W301",
        f"{type(obj).__name__}.show_full_result_count is True: every filtered changelist also "
        "runs COUNT(*) over the whole table.",
        "Remove show_full_result_count (ScaleModelAdmin sets it to False).",
        obj=type(obj),
    )


def _w302_distinct_filter(obj: Any, entry: Any) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W302",
        f"{type(obj).__name__}.list_filter entry {entry!r} lists its choices with SELECT DISTINCT "
        "over the whole table on every changelist load.",
        "Give the field name alone (ScaleModelAdmin then takes the choices from the "
        "statistics) or a SimpleListFilter with fixed choices.",
        obj=type(obj),
    )


def _w303_search_without_trigram_index(obj: Any, term: str, field: str) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W303",
        f"{type(obj).__name__}.search_fields entry {term!r} searches {field!r} by substring, "
        "which scans the whole table: no trigram index serves it.",
        f"Add django_scale.indexes.TrigramIndex(fields=[{field!r}], name=...) to the model's "
        "Meta.indexes (and TrigramExtension() to a migration before it), or search with '^' "
        "(startswith) or '=' (exact).",
        obj=type(obj),
    )


def _w304_unindexed_sortable(obj: Any, columns: list[str]) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W304",
        f"{type(obj).__name__} lets the changelist sort by {', '.join(repr(c) for c in columns)}, "
        "which no index starts with: sorting a big table by them reads all of it.",
        "Index those columns, or leave them out of sortable_by.",
        obj=type(obj),
    )


def _trigram_expression_field(expression: Any) -> str | None:
    """The field of ``OpClass(Upper(F(field)), "gin_trgm_ops")`` (or with a cast), else ``None``."""
    if not isinstance(expression, OpClass) or "trgm" not in str(expression.extra.get("name", "")):
        return None
    inner: Any = expression.source_expressions[0]
    if not isinstance(inner, Upper):
        return None
    inner = inner.source_expressions[0]
    if isinstance(inner, Cast):
        inner = inner.source_expressions[0]
    return str(getattr(inner, "name", "")) or None if isinstance(inner, F) else None


def _indexed_columns(model: type[Model]) -> tuple[set[str], set[str], set[str]]:
    """Return the fields that lead a B-tree index, and those with a trigram index of the
    plain column (``contains``, ``regex``) and of ``UPPER(column)`` (``icontains``)."""
    btree: set[str] = {model._meta.pk.name} if model._meta.pk else set()
    plain_trigram: set[str] = set()
    upper_trigram: set[str] = set()
    for field in model._meta.concrete_fields:
        if getattr(field, "db_index", False) or field.unique or field.is_relation:
            btree.add(field.name)
    for index in model._meta.indexes:
        names = [name.lstrip("-") for name in index.fields]
        if isinstance(index, TrigramIndex):
            upper_trigram.update(index.search_fields)
        elif {"gin_trgm_ops", "gist_trgm_ops"} & set(getattr(index, "opclasses", None) or ()):
            plain_trigram.update(names)
        elif names and isinstance(index, Index) and not isinstance(index, NOT_BTREE_INDEXES):
            btree.add(names[0])
        for expression in index.expressions:
            name = _trigram_expression_field(expression)
            if name:
                upper_trigram.add(name)
    for constraint in model._meta.constraints:
        fields = getattr(constraint, "fields", None)
        if fields:
            btree.add(fields[0])
    for together in model._meta.unique_together:
        if together:
            btree.add(together[0])
    return btree, plain_trigram, upper_trigram


class ScaleModelAdminChecks(ModelAdminChecks):
    """Django's ``ModelAdmin`` checks plus those for options that are slow on big tables."""

    def check(self, admin_obj: Any, **kwargs: Any) -> list[CheckMessage]:
        messages: list[CheckMessage] = list(super().check(admin_obj, **kwargs))
        model = admin_obj.model
        if admin_obj.show_full_result_count:
            messages.append(_w301_full_result_count(admin_obj))
        for entry in admin_obj.list_filter:
            spec = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else entry
            if (
                isinstance(spec, type)
                and issubclass(spec, DISTINCT_FILTERS)
                and not issubclass(spec, ScaleAllValuesFieldListFilter)
            ):
                messages.append(_w302_distinct_filter(admin_obj, entry))
        btree, plain_trigram, upper_trigram = _indexed_columns(model)
        if any("postgresql" in db.get("ENGINE", "") for db in settings.DATABASES.values()):
            for term in admin_obj.search_fields:
                if term[:1] in "^@":
                    continue
                # "=title" is title__iexact: UPPER(title) = UPPER(...), which only an index of
                # UPPER(title) serves (a trigram one does, on PostgreSQL 14 and later).
                name, _, lookup = term.removeprefix("=").partition("__")
                lookup = (
                    "iexact" if term[:1] == "=" else lookup.rsplit("__", 1)[-1] if lookup else "icontains"
                )
                if lookup not in SUBSTRING_LOOKUPS:
                    continue
                # Django compares UPPER(column) for the case-insensitive lookups but icontains'
                # siblings iregex and the case-sensitive ones use the plain column.
                served = upper_trigram if lookup in UPPER_LOOKUPS else plain_trigram
                if name not in served:
                    messages.append(_w303_search_without_trigram_index(admin_obj, term, name))
        sortable = admin_obj.sortable_by if admin_obj.sortable_by is not None else admin_obj.list_display
        concrete = {field.name for field in model._meta.concrete_fields}
        unindexed = [
            name for name in sortable if isinstance(name, str) and name in concrete and name not in btree
        ]
        if unindexed:
            messages.append(_w304_unindexed_sortable(admin_obj, unindexed))
        messages.extend(check_admin_indexes(admin_obj))
        return messages
