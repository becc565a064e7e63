"""List filters whose choices never scan a big table nor list a row the admin hides."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.filters import AllValuesFieldListFilter
from django.contrib.admin.utils import NotRelationField, get_fields_from_path, reverse_field_path
from django.core.exceptions import FieldDoesNotExist
from django.db import connections, models, router
from django.db.models import Model, QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.db.models.query import EmptyQuerySet
from django.http import HttpRequest

from django_scale.admin.fallback import or_fallback

__all__ = [
    "MAX_FILTER_CHOICES",
    "ScaleAllValuesFieldListFilter",
    "ScaleRelatedFieldListFilter",
    "distinct_values",
    "selects_whole_table",
    "uses_all_values_filter",
    "uses_related_filter",
]


def selects_whole_table(queryset: QuerySet[Any]) -> bool:
    """Return whether *queryset* selects every row of its model's table.

    Only then do the table's statistics (``pg_stats``, ``pg_class``, the planner's estimates)
    describe the rows the queryset shows, and only then may the admin take filter choices and
    counts from them. A filter of any kind (``filter()``, ``exclude()``, ``none()``, a
    filtering default manager, ``extra(where=...)``, a ``HAVING``), a slice, a ``union()``,
    ``DISTINCT ON`` or ``extra(tables=...)`` makes it "restricted"; ordering, ``distinct()``,
    ``select_related()``, ``only()`` and annotations, aggregates included, do not.
    """
    if isinstance(queryset, EmptyQuerySet):
        return False
    query: Any = queryset.query
    # Django has no public API for "this queryset has no conditions", so this reads Django's
    # Query (django/db/models/sql/query.py, the same in 4.2 to 6.1): has_filters() is its
    # WHERE, which holds the HAVING conditions too until compiled (Query.where, "split into
    # WHERE and HAVING" in SQLCompiler.pre_sql_setup); is_sliced a LIMIT/OFFSET; combinator
    # union/intersection/difference; distinct_fields DISTINCT ON; extra_tables the tables of
    # extra(tables=...), a cross join. tests/test_admin_isolation.py pins each of them.
    return not (
        query.has_filters()
        or query.is_sliced
        or query.combinator
        or query.distinct_fields
        or query.extra_tables
    )


#: Most values a plain-field filter lists.
MAX_FILTER_CHOICES = 100


def distinct_values(queryset: QuerySet[Any], field_name: str, limit: int = MAX_FILTER_CHOICES) -> list[Any]:
    """Return up to *limit* values of *field_name* in *queryset*'s rows, for a filter.

    *field_name* is a field of the queryset's model or a path through relations
    (``"author__name"``). The values are the column's most common values from the statistics
    (``pg_stats``) of the queryset's own alias only when those describe exactly the
    queryset's rows: on PostgreSQL, for a column of the model's own table, when the queryset
    :func:`selects the whole table <selects_whole_table>`. Otherwise, or before the table was
    analysed, they come from a ``DISTINCT`` with a ``LIMIT`` over the queryset itself, so a
    restricted queryset never lists a value that only rows it hides have.
    """
    alias = queryset.db
    queryset = queryset.using(alias)  # the statistics and the fallback from the same database
    connection = connections[alias]
    model = queryset.model
    field = None if LOOKUP_SEP in field_name else model._meta.get_field(field_name)
    column = getattr(field, "column", None)
    # A field inherited from a parent model (multi-table inheritance) is a column of the
    # parent's table, whose statistics cover the parent's other rows too.
    own_table = field is not None and field.model._meta.db_table == model._meta.db_table
    if connection.vendor == "postgresql" and column and own_table and selects_whole_table(queryset):
        with connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT s.null_frac > 0, v
                  FROM pg_stats s
                  LEFT JOIN LATERAL unnest(s.most_common_vals::text::text[]) AS v ON true
                 WHERE s.schemaname = current_schema() AND s.tablename = %s AND s.attname = %s
                 LIMIT %s
                """,
                [model._meta.db_table, column, limit],
            )
            rows = cursor.fetchall()
        values: list[Any] = sorted({value for _, value in rows if value is not None})
        if values:
            return [*values, None] if rows[0][0] else values
        # Not analysed yet, or no value common enough to be listed: a bounded DISTINCT.
    bounded = queryset.order_by(field_name).values_list(field_name, flat=True).distinct()[:limit]
    return list(bounded)


class ScaleAllValuesFieldListFilter(AllValuesFieldListFilter):
    """``AllValuesFieldListFilter`` whose choices come from statistics, not a full ``DISTINCT``.

    The statistics serve only an admin whose ``get_queryset()`` selects the whole table; a
    restricted one lists the values of its own rows, with a bounded ``DISTINCT``.
    """

    def __init__(
        self,
        field: Any,
        request: HttpRequest,
        params: dict[str, Any],
        model: type[Model],
        model_admin: admin.ModelAdmin,  # type: ignore[type-arg]
        field_path: str,
    ) -> None:
        super().__init__(field, request, params, model, model_admin, field_path)
        # Django's choices are a lazy SELECT DISTINCT over the whole table: the admin's
        # queryset for a field of the model, the related model's for a field through a
        # relation (author__name lists every author's name).
        root = model_admin.get_queryset(request)
        parent_model, _ = reverse_field_path(model, field_path)
        if selects_whole_table(root):
            source = root if parent_model == model else parent_model._default_manager.all()
            name = field.name
        else:
            # The admin shows some rows only: the values of those rows, even through a
            # relation, never a value that only rows it hides have.
            source, name = root, field_path
        choices: Any = or_fallback(
            source.db, lambda: distinct_values(source, name), list, f"choices of the {field.name!r} filter"
        )
        self.lookup_choices = choices


class ScaleRelatedFieldListFilter(admin.RelatedFieldListFilter):
    """``RelatedFieldListFilter`` that lists at most ``MAX_FILTER_CHOICES`` related rows.

    Django's lists every row of the related table (every author, to filter articles by
    author); past a hundred choices a filter is for the search box anyway. When the admin's
    ``get_queryset()`` is restricted, only related rows that its rows refer to are listed
    (as ``RelatedOnlyFieldListFilter`` does), a row chosen in the URL included.
    """

    def field_choices(self, field: Any, request: HttpRequest, model_admin: Any) -> Any:
        alias = router.db_for_read(field.related_model)
        return or_fallback(
            alias,
            lambda: self._field_choices(field, request, model_admin),
            list,
            f"choices of the {field.name!r} filter",
        )

    def _field_choices(self, field: Any, request: HttpRequest, model_admin: Any) -> Any:
        remote = getattr(field, "remote_field", None)
        forward = remote is not None and hasattr(remote, "get_related_field") and not field.auto_created
        root = model_admin.get_queryset(request)
        whole = selects_whole_table(root)
        if whole and not forward:
            return super().field_choices(field, request, model_admin)
        related = field.related_model._default_manager.all()
        if forward:
            related = related.complex_filter(field.get_limit_choices_to())
        if not whole:
            # Only the related rows that the admin's own rows refer to.
            related = related.filter(pk__in=root.values(f"{self.field_path}{LOOKUP_SEP}pk"))
        ordering = self.field_admin_ordering(field, request, model_admin) or ()
        # What the filter's lookup compares: the related field (to_field) of a foreign key,
        # the primary key of a reverse relation.
        attname = field.target_field.attname
        rows = list(related.order_by(*ordering)[:MAX_FILTER_CHOICES])
        choices: list[tuple[Any, str]] = [(getattr(row, attname), str(row)) for row in rows]
        selected = self.lookup_val
        shown = {str(value) for value, _ in choices}
        for value in selected if isinstance(selected, list) else [selected] if selected else []:
            # Keep the chosen row listed even when it is past the first hundred.
            if str(value) not in shown:
                row = related.filter(**{attname: value}).first()
                if row is not None:
                    choices.append((getattr(row, attname), str(row)))
        return choices


def _filter_field(model: type[Model], name: str) -> Any:
    """The field a list_filter entry *name* filters on, or ``None`` if it names none."""
    try:
        return get_fields_from_path(model, name)[-1]
    except (FieldDoesNotExist, NotRelationField):
        return None


def uses_related_filter(model: type[Model], name: str) -> bool:
    """Whether Django would give the list_filter entry *name* a ``RelatedFieldListFilter``.

    Django gives it to reverse relations too (``FieldListFilter.create`` tests
    ``field.remote_field``); a restricted admin must not list their hidden rows either.
    """
    field = _filter_field(model, name)
    return field is not None and bool(getattr(field, "remote_field", None))


def uses_all_values_filter(model: type[Model], name: str) -> bool:
    """Whether Django would give the list_filter entry *name* an ``AllValuesFieldListFilter``."""
    field = _filter_field(model, name)
    if field is None:
        return False
    return not (
        field.is_relation
        or getattr(field, "flatchoices", None)
        or isinstance(field, (models.BooleanField, models.DateField))
    )
