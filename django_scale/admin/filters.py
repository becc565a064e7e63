"""List filters whose choices never scan a big table nor list a row the admin hides."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from django.contrib import admin
from django.contrib.admin.filters import AllValuesFieldListFilter, FieldListFilter
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import reverse_field_path
from django.core.exceptions import ValidationError
from django.db import connections, router
from django.db.models import Model, QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.db.models.manager import BaseManager
from django.db.models.query import EmptyQuerySet
from django.http import HttpRequest

from django_scale.admin.fallback import or_fallback

__all__ = [
    "MAX_FILTER_CHOICES",
    "SAFE_METHODS",
    "ScaleAllValuesFieldListFilter",
    "ScaleRelatedFieldListFilter",
    "create_filter",
    "distinct_values",
    "selects_whole_table",
]

#: Methods that never write, whose pages may be read from a replica.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def selects_whole_table(queryset: QuerySet[Any] | BaseManager[Any]) -> bool:
    """Return whether *queryset* selects every row of its model's table.

    Only then do the table's statistics (``pg_stats``, ``pg_class``, the planner's estimates)
    describe the rows the queryset shows, and only then may the admin take filter choices and
    counts from them. A filter of any kind (``filter()``, ``exclude()``, ``none()``, a
    filtering default manager, ``extra(where=...)``, a ``HAVING``), a slice, a ``union()``,
    ``DISTINCT ON`` or ``extra(tables=...)`` makes it "restricted"; ordering, ``distinct()``,
    ``select_related()``, ``only()`` and annotations, aggregates included, do not.
    """
    if isinstance(queryset, BaseManager):
        queryset = queryset.all()  # get_queryset() may return a manager; Django accepts one
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


class LazyChoices(Sequence[Any]):
    """A filter's choices, queried the first time they are read (never, if not displayed)."""

    def __init__(self, compute: Callable[[], Sequence[Any]]) -> None:
        self._compute: Callable[[], Sequence[Any]] | None = compute
        self._choices: list[Any] = []

    @property
    def evaluated(self) -> bool:
        """Whether the choices have been queried."""
        return self._compute is None

    def _get(self) -> list[Any]:
        if self._compute is not None:
            self._choices = list(self._compute())
            self._compute = None
        return self._choices

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._get())

    def __eq__(self, other: object) -> bool:
        # Compares as the list Django's filters hold (tests compare lookup_choices to one).
        if isinstance(other, LazyChoices):
            other = other._get()
        return self._get() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._get()) if self.evaluated else "<LazyChoices (not queried yet)>"


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
        # Queried when the page shows them: a POST (an action) that redirects lists none.
        # django-stubs types lookup_choices as a QuerySet; Django only iterates it.
        self.lookup_choices = LazyChoices(  # type: ignore[assignment]
            lambda: or_fallback(
                source.db,
                lambda: distinct_values(source, name),
                list,
                f"choices of the {field.name!r} filter",
            )
        )


class ScaleRelatedFieldListFilter(admin.RelatedFieldListFilter):
    """``RelatedFieldListFilter`` that lists at most ``MAX_FILTER_CHOICES`` related rows.

    Django's lists every row of the related table (every author, to filter articles by
    author); past a hundred choices a filter is for the search box anyway. When the admin's
    ``get_queryset()`` is restricted, only related rows that its rows refer to are listed
    (as ``RelatedOnlyFieldListFilter`` does), a row chosen in the URL included.

    The choices are queried when the page shows them, or when a GET asks whether the filter
    has any (``has_output()``); a POST, which Django answers with a redirect unless the form
    has errors, does not query them.
    """

    def field_choices(self, field: Any, request: HttpRequest, model_admin: Any) -> Any:
        self._django_scale_method = request.method
        if request.method in SAFE_METHODS:
            # A chosen value that is not one (?author__id__exact=abc) is Django's ?e=1
            # redirect: check it while the filters are built, where Django turns the error
            # into IncorrectLookupParameters, rather than when the page shows the choices.
            self._chosen_values(field)
        alias = router.db_for_read(field.related_model)
        return LazyChoices(
            lambda: or_fallback(
                alias,
                lambda: self._field_choices(field, request, model_admin),
                list,
                f"choices of the {field.name!r} filter",
            )
        )

    def has_output(self) -> bool:
        choices = self.lookup_choices
        unsafe = getattr(self, "_django_scale_method", "GET") not in SAFE_METHODS
        if unsafe and isinstance(choices, LazyChoices) and not choices.evaluated:
            # Listed on a POST without its choices queried; a page that renders shows
            # those choices then (an empty filter is then listed, where Django hides it).
            return True
        return bool(super().has_output())

    def _chosen_values(self, field: Any) -> list[Any]:
        """The related field's values chosen in the URL, converted as the lookup converts them."""
        selected = self.lookup_val
        raw = selected if isinstance(selected, list) else [selected] if selected else []
        target = field.target_field
        try:
            return [target.to_python(value) for value in raw]
        except (ValueError, ValidationError) as error:
            # What Django's FieldListFilter.queryset() raises for the same value.
            raise IncorrectLookupParameters(error) from error

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
        # As Django's Field.get_choices(ordering=...): the related admin's ordering if it has
        # one, else the related model's own (Meta.ordering); the primary key when neither
        # orders it, so that "the first hundred" are the same rows on every load.
        ordering = self.field_admin_ordering(field, request, model_admin)
        if ordering:
            related = related.order_by(*ordering)
        elif not related.ordered:
            related = related.order_by("pk")
        # What the filter's lookup compares: the related field (to_field) of a foreign key,
        # the primary key of a reverse relation.
        attname = field.target_field.attname
        rows = list(related[:MAX_FILTER_CHOICES])
        choices: list[tuple[Any, str]] = [(getattr(row, attname), str(row)) for row in rows]
        shown = {str(value) for value, _ in choices}
        for value in self._chosen_values(field):
            # Keep the chosen row listed even when it is past the first hundred.
            if str(value) not in shown:
                row = related.filter(**{attname: value}).first()
                if row is not None:
                    choices.append((getattr(row, attname), str(row)))
        return choices


#: Django's filter classes and the ones :func:`create_filter` gives in their place.
SCALED_FILTERS: dict[type[Any], type[Any]] = {
    admin.RelatedFieldListFilter: ScaleRelatedFieldListFilter,
    AllValuesFieldListFilter: ScaleAllValuesFieldListFilter,
}


def create_filter(
    field: Any,
    request: HttpRequest,
    params: dict[str, Any],
    model: type[Model],
    model_admin: Any,
    field_path: str,
) -> FieldListFilter | None:
    """Create the filter Django would create for a ``list_filter`` field name, scaled.

    Django's ``FieldListFilter.create()`` picks the first registered class whose test accepts
    the field (``FieldListFilter.register()``, a project's own ``take_priority`` classes
    first). This picks the same class and gives :class:`ScaleRelatedFieldListFilter` in place
    of ``RelatedFieldListFilter`` and :class:`ScaleAllValuesFieldListFilter` in place of
    ``AllValuesFieldListFilter`` (exactly those classes, not subclasses of them).
    ``ScaleChangeList`` uses it for each field name in ``list_filter``.
    """
    # FieldListFilter._field_list_filters is the registry that FieldListFilter.register()
    # fills and create() walks, a list of (test, class) pairs (django/contrib/admin/filters.py,
    # the same in Django 4.2 to 6.1); there is no public way to ask which class it picks
    # without creating (and querying) Django's filter. tests/test_admin_dropin.py
    # (test_create_filter_picks_the_class_django_picks) pins it on every Django.
    registry: list[tuple[Callable[[Any], Any], type[Any]]] = FieldListFilter._field_list_filters  # type: ignore[attr-defined]
    for test, filter_class in registry:
        if test(field):
            chosen = SCALED_FILTERS.get(filter_class, filter_class)
            return chosen(field, request, params, model, model_admin, field_path=field_path)  # type: ignore[no-any-return]
    return None
