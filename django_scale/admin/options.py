"""``ScaleModelAdmin``: the project-wide base ``ModelAdmin`` for big tables and replicas.

Subclass it instead of :class:`django.contrib.admin.ModelAdmin`::

    from django_scale.admin import ScaleModelAdmin

    @admin.register(Article)
    class ArticleAdmin(ScaleModelAdmin):
        list_display = ["title", "author", "published"]

With :class:`~django_scale.routers.ReplicaRouter` installed, the admin's GET pages (the
changelist, the change form, the delete confirmation, the history) read from a replica. A
POST loads the object from the primary inside a transaction, so a replica's stale values can
never be saved back over newer ones.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.contrib import admin
from django.contrib import messages as user_messages
from django.contrib.admin.checks import ModelAdminChecks
from django.contrib.admin.filters import AllValuesFieldListFilter
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import NotRelationField, get_fields_from_path, reverse_field_path
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.core import checks, signing
from django.core.checks import CheckMessage
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.core.paginator import InvalidPage
from django.db import DatabaseError, connections, models, router, transaction
from django.db.models import Model, Q, QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.db.models.expressions import F, RawSQL
from django.db.models.functions import Cast, Upper
from django.db.models.query import EmptyQuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import SimpleTemplateResponse
from django.utils import timezone
from django.utils.translation import gettext

from django_scale.checks import _message
from django_scale.conf import conf
from django_scale.counting import ApproxCount
from django_scale.indexes import TrigramIndex
from django_scale.paginator import ApproxCountPaginator
from django_scale.replicas import use_primary
from django_scale.timeouts import current_statement_timeout, is_statement_timeout, statement_timeout

__all__ = [
    "ScaleAllValuesFieldListFilter",
    "ScaleRelatedFieldListFilter",
    "ScaleChangeList",
    "ScaleModelAdmin",
    "ScaleModelAdminChecks",
    "distinct_values",
    "selects_whole_table",
]

#: Methods that never write, whose pages may be read from a replica.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

logger = logging.getLogger("django_scale.admin")
T = TypeVar("T")


def _or_fallback(alias: str, compute: Callable[[], T], fallback: Callable[[], T], what: str) -> T:
    """Return ``compute()``, or ``fallback()`` if a statement of it ran out of time.

    Under the page's :func:`~django_scale.timeouts.statement_timeout`, the statements run in
    their own block: inside a transaction (``ATOMIC_REQUESTS``) that is a savepoint, so a
    cancelled statement leaves the rest of the request's transaction usable.
    """
    seconds = current_statement_timeout(alias)
    if seconds is None:
        return compute()
    try:
        with statement_timeout(seconds, using=alias):
            return compute()
    except DatabaseError as error:
        if not is_statement_timeout(error):
            raise
        logger.warning("The admin's %s ran out of time (%s s) on %r; falling back.", what, seconds, alias)
        return fallback()


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
        choices: Any = _or_fallback(
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
        return _or_fallback(
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


def _uses_related_filter(model: type[Model], name: str) -> bool:
    """Whether Django would give the list_filter entry *name* a ``RelatedFieldListFilter``.

    Django gives it to reverse relations too (``FieldListFilter.create`` tests
    ``field.remote_field``); a restricted admin must not list their hidden rows either.
    """
    field = _filter_field(model, name)
    return field is not None and bool(getattr(field, "remote_field", None))


def _uses_all_values_filter(model: type[Model], name: str) -> bool:
    """Whether Django would give the list_filter entry *name* an ``AllValuesFieldListFilter``."""
    field = _filter_field(model, name)
    if field is None:
        return False
    return not (
        field.is_relation
        or getattr(field, "flatchoices", None)
        or isinstance(field, (models.BooleanField, models.DateField))
    )


# -- Checks (3xx) ---------------------------------------------------------------------------

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
    )


def _w302_distinct_filter(obj: Any, entry: Any) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W302",
        f"{type(obj).__name__}.list_filter entry {entry!r} lists its choices with SELECT DISTINCT "
        "over the whole table on every changelist load.",
        "Give the field name alone (ScaleModelAdmin then takes the choices from the "
        "statistics) or a SimpleListFilter with fixed choices.",
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
    )


def _w304_unindexed_sortable(obj: Any, columns: list[str]) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W304",
        f"{type(obj).__name__} lets the changelist sort by {', '.join(repr(c) for c in columns)}, "
        "which no index starts with: sorting a big table by them reads all of it.",
        "Index those columns, or leave them out of sortable_by.",
    )


def _trigram_expression_field(expression: Any) -> str | None:
    """The field of ``OpClass(Upper(F(field)), "gin_trgm_ops")`` (or with a cast), else ``None``."""
    if type(expression).__name__ != "OpClass" or "trgm" not in str(expression.extra.get("name", "")):
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
        elif names and type(index).__name__ in ("Index", "BTreeIndex"):
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
        return messages


# -- Date hierarchy ----------------------------------------------------------------------------

#: Most periods the date hierarchy probes one by one; past this it lists them unprobed.
MAX_PERIOD_PROBES = 100


def _period_starts(first: datetime.date, last: datetime.date, kind: str) -> list[datetime.date]:
    """Every year, month or day from *first*'s to *last*'s, as the first date of each."""
    if kind == "year":
        return [datetime.date(year, 1, 1) for year in range(first.year, last.year + 1)]
    if kind == "month":
        starts, year, month = [], first.year, first.month
        while (year, month) <= (last.year, last.month):
            starts.append(datetime.date(year, month, 1))
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return starts
    return [first + datetime.timedelta(days=n) for n in range((last - first).days + 1)]


def _next_start(start: datetime.date, kind: str) -> datetime.date:
    if kind == "year":
        return datetime.date(start.year + 1, 1, 1)
    if kind == "month":
        return datetime.date(start.year + (start.month == 12), start.month % 12 + 1, 1)
    return start + datetime.timedelta(days=1)


class PeriodProbeQuerySetMixin:
    """``dates()`` / ``datetimes()`` by index probes instead of a ``DISTINCT`` over the table.

    Django's date hierarchy lists the years (months, days) that have rows with
    ``SELECT DISTINCT date_trunc(...)`` over every matching row. This finds the first and
    last value (two index lookups with an index on the field) and asks, for each period in
    between, whether a row exists in it: at most a hundred cheap probes.

    When the changelist knows the rows are few (an exact count under the paginator's
    threshold, such as a search for a rare word), it reads their values instead: on a big
    table ``MIN()`` of a filter the planner cannot estimate walks the field's index until a row
    matches, which for a rare word is the whole table.
    """

    #: Set by :class:`ScaleChangeList` when the queryset is known to hold few rows.
    _django_scale_few_rows = False

    def _few_values(self, field_name: str) -> list[Any]:
        key = f"_django_scale_values_{field_name}"
        if key not in self.__dict__:
            queryset: Any = self
            # No ORDER BY and no LIMIT: nothing tempts the planner into walking an index.
            values = queryset.order_by().values_list(field_name, flat=True)
            self.__dict__[key] = [value for value in values if value is not None]
        return list(self.__dict__[key])

    def aggregate(self, *args: Any, **kwargs: Any) -> Any:
        # The date hierarchy asks cl.queryset for the first and last dates, then for the
        # periods: remember the bounds so that the probes do not ask the database again.
        first, last = kwargs.get("first"), kwargs.get("last")
        if (
            args
            or set(kwargs) != {"first", "last"}
            or not (isinstance(first, models.Min) and isinstance(last, models.Max))
        ):
            return super().aggregate(*args, **kwargs)  # type: ignore[misc]
        name = getattr(first.source_expressions[0], "name", "")
        key = f"_django_scale_bounds_{name}"
        if key not in self.__dict__:

            def bounds() -> dict[str, Any]:
                if self._django_scale_few_rows and name:
                    values = self._few_values(name)
                    return {"first": min(values, default=None), "last": max(values, default=None)}
                return super(PeriodProbeQuerySetMixin, self).aggregate(*args, **kwargs)  # type: ignore[misc, no-any-return]

            self.__dict__[key] = _or_fallback(
                self.db,  # type: ignore[attr-defined]
                bounds,
                lambda: {"first": None, "last": None},
                "date hierarchy",
            )
        return dict(self.__dict__[key])

    def _probe_periods(self, field_name: str, kind: str, order: str, as_datetimes: bool) -> list[Any]:
        queryset: Any = self
        bounds = queryset.aggregate(first=models.Min(field_name), last=models.Max(field_name))
        first, last = bounds["first"], bounds["last"]
        if first is None or last is None:
            return []
        zone = timezone.get_current_timezone() if as_datetimes and settings.USE_TZ else None
        if as_datetimes:
            first, last = (timezone.localtime(v, zone) if zone else v for v in (first, last))
        starts = _period_starts(
            first.date() if isinstance(first, datetime.datetime) else first,
            last.date() if isinstance(last, datetime.datetime) else last,
            kind,
        )

        def bound(day: datetime.date) -> Any:
            if not as_datetimes:
                return day
            moment = datetime.datetime(day.year, day.month, day.day)
            return timezone.make_aware(moment, zone) if zone else moment

        if self._django_scale_few_rows:
            seen = set()
            for value in self._few_values(field_name):
                local = timezone.localtime(value, zone) if as_datetimes and zone else value
                day = local.date() if isinstance(local, datetime.datetime) else local
                seen.add(
                    datetime.date(day.year, 1, 1)
                    if kind == "year"
                    else datetime.date(day.year, day.month, 1)
                    if kind == "month"
                    else day
                )
            ordered = [bound(start) for start in sorted(seen)]
            return ordered if order == "ASC" else ordered[::-1]
        found = []
        for start in starts:
            lookups = {
                f"{field_name}__gte": bound(start),
                f"{field_name}__lt": bound(_next_start(start, kind)),
            }
            if len(starts) > MAX_PERIOD_PROBES or queryset.filter(**lookups).exists():
                found.append(bound(start))
        return found if order == "ASC" else found[::-1]

    def _periods(self, field_name: str, kind: str, order: str, as_datetimes: bool) -> list[Any]:
        alias = self.db  # type: ignore[attr-defined]
        return _or_fallback(
            alias,
            lambda: self._probe_periods(field_name, kind, order, as_datetimes),
            list,
            "date hierarchy",
        )

    def dates(self, field_name: str, kind: str, order: str = "ASC") -> Any:
        if kind not in ("year", "month", "day"):
            return super().dates(field_name, kind, order)  # type: ignore[misc]
        return self._periods(field_name, kind, order, as_datetimes=False)

    def datetimes(
        self, field_name: str, kind: str, order: str = "ASC", tzinfo: Any = None, **kwargs: Any
    ) -> Any:
        if kind not in ("year", "month", "day") or tzinfo is not None or kwargs:
            return super().datetimes(field_name, kind, order, tzinfo, **kwargs)  # type: ignore[misc]
        return self._periods(field_name, kind, order, as_datetimes=True)


_probing_classes: dict[type, type] = {}


def _with_period_probes(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """Return *queryset* as an instance of a subclass of its class that probes periods."""
    base = type(queryset)
    if issubclass(base, PeriodProbeQuerySetMixin):
        return queryset
    probing = _probing_classes.get(base)
    if probing is None:
        probing = _probing_classes[base] = type(
            f"PeriodProbing{base.__name__}", (PeriodProbeQuerySetMixin, base), {}
        )
    clone = queryset._chain()  # type: ignore[attr-defined]
    clone.__class__ = probing
    return clone  # type: ignore[no-any-return]


# -- Keyset pagination -------------------------------------------------------------------------

#: The query parameter that carries a signed keyset cursor to the next page.
CURSOR_VAR = "_after"
_CURSOR_SALT = "django_scale.admin.cursor"


def _keyset(queryset: QuerySet[Any]) -> list[tuple[str, bool, Any]] | None:
    """The ordering of *queryset* as (field name, descending, field), when keyset can follow it.

    Only plain, non-null columns of the model itself qualify: a NULL or an ordering through a
    relation has no simple "after this row" condition.
    """
    keys = []
    for item in queryset.query.order_by:
        if not isinstance(item, str) or "__" in item or "?" in item:
            return None
        descending, name = item.startswith("-"), item.lstrip("-")
        try:
            field = queryset.model._meta.pk if name == "pk" else queryset.model._meta.get_field(name)
        except FieldDoesNotExist:
            return None
        if field is None or not getattr(field, "concrete", False) or field.null or field.is_relation:
            return None
        keys.append((name, descending, field))
    return keys or None


def _after(keys: list[tuple[str, bool, Any]], values: list[Any], model: type[Model]) -> Any:
    """The rows that come after *values* in the ordering *keys*.

    With one direction throughout, a row comparison ``(a, b) < (x, y)``, which PostgreSQL
    serves as one index range; otherwise the same condition spelled out with ``OR``.
    """
    values = [field.to_python(value) for (_, _, field), value in zip(keys, values, strict=True)]
    directions = {descending for _, descending, _ in keys}
    if len(keys) > 1 and len(directions) == 1:
        # The primary and the replicas share a vendor (check E104), hence the quoting.
        quote = connections[conf.PRIMARY].ops.quote_name
        table = quote(model._meta.db_table)
        columns = ", ".join(f"{table}.{quote(field.column)}" for _, _, field in keys)
        placeholders = ", ".join(["%s"] * len(values))
        operator = "<" if directions == {True} else ">"
        return RawSQL(f"({columns}) {operator} ({placeholders})", values, output_field=models.BooleanField())
    condition = Q()
    for i, (name, descending, _) in enumerate(keys):
        step = Q(**{f"{name}__{'lt' if descending else 'gt'}": values[i]})
        for (earlier, _, _), value in zip(keys[:i], values[:i], strict=True):
            step &= Q(**{earlier: value})
        condition |= step
    return condition


class ScaleChangeList(ChangeList):
    """A ``ChangeList`` that counts approximately and always fetches a ``LIMIT``ed page.

    Django's own shows the whole queryset, with no ``LIMIT``, when the count says everything
    fits on one page; with an estimate that is too low that would load the whole table.
    """

    #: The signed cursor that the link to the next page carries, if keyset can serve it.
    _next_cursor: str | None = None

    def __init__(self, request: HttpRequest, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, *args, **kwargs)
        # Like the page number, the cursor is not a filter: the search form, which copies
        # the parameters into hidden inputs, must not send one page's cursor with a search.
        for params in (self.params, getattr(self, "filter_params", {})):
            params.pop(CURSOR_VAR, None)

    def _fingerprint(self, request: HttpRequest) -> str:
        """What a cursor is valid for: the filters, search and ordering, not the page."""
        kept = sorted((key, value) for key, value in request.GET.items() if key not in (PAGE_VAR, CURSOR_VAR))
        return hashlib.sha256(repr(kept).encode()).hexdigest()[:16]

    def _cursor_filter(self, request: HttpRequest, keys: Any, fingerprint: str) -> Any:
        raw = request.GET.get(CURSOR_VAR)
        if not raw or not keys:
            return None
        try:
            data = signing.loads(raw, salt=_CURSOR_SALT)
        except signing.BadSignature:
            return None
        if not isinstance(data, dict) or data.get("p") != self.page_num or data.get("f") != fingerprint:
            return None  # for another page, filter or ordering: fall back to the OFFSET
        values = data.get("k")
        if not isinstance(values, list) or len(values) != len(keys):
            return None
        try:
            return _after(keys, values, self.model)
        except ValidationError:
            return None

    def get_filters_params(self, params: Any = None) -> Any:
        lookup_params = super().get_filters_params(params)
        lookup_params.pop(CURSOR_VAR, None)
        return lookup_params

    def get_query_string(self, new_params: Any = None, remove: Any = None) -> str:
        """Links carry the keyset cursor only to the next page; every other link drops it."""
        new_params = dict(new_params or {})
        remove = list(remove or [])
        page = new_params.get(PAGE_VAR)
        if self._next_cursor and page is not None and str(page) == str(self.page_num + 1):
            new_params[CURSOR_VAR] = self._next_cursor
        else:
            remove.append(CURSOR_VAR)
        return super().get_query_string(new_params, remove)

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> Any:
        queryset = (
            super().get_queryset(request, exclude_parameters)
            if exclude_parameters
            else super().get_queryset(request)
        )
        # The date hierarchy reads cl.queryset.dates()/datetimes(): make them probe periods.
        return _with_period_probes(queryset) if self.date_hierarchy else queryset

    def get_results(self, request: HttpRequest) -> None:
        paginator = self.model_admin.get_paginator(request, self.queryset, self.list_per_page)
        if not isinstance(paginator, ApproxCountPaginator):
            super().get_results(request)
            return
        if not selects_whole_table(self.root_queryset):
            # An estimate from the table's statistics would tell a restricted admin how many
            # rows it does not show: count its rows instead (exact, or a lower bound).
            paginator.count_statistics = False
        # The page first: when it is the last one, its rows give the exact count and no
        # count runs at all (a search for a rare word would otherwise scan the table twice).
        keys = _keyset(self.queryset)
        fingerprint = self._fingerprint(request)
        after = self._cursor_filter(request, keys, fingerprint)
        alias = self.queryset.db
        try:
            page = _or_fallback(
                alias, lambda: paginator.page(self.page_num, after=after), lambda: None, "changelist page"
            )
        except InvalidPage as exc:
            raise IncorrectLookupParameters from exc
        if page is None:
            self._show_timed_out(request, paginator)
            return
        rows = list(page.object_list)
        if keys and rows and page.has_next():
            values = [field.value_to_string(rows[-1]) for _, _, field in keys]
            self._next_cursor = signing.dumps(
                {"p": self.page_num + 1, "k": values, "f": fingerprint}, salt=_CURSOR_SALT, compress=True
            )
        count = _or_fallback(
            alias,
            lambda: paginator.count,
            # At least the rows up to the end of this page, and one more on the next.
            lambda: ApproxCount(self.page_num * self.list_per_page, "capped"),
            "count",
        )
        paginator.__dict__["count"] = count
        if isinstance(self.queryset, PeriodProbeQuerySetMixin) and count.is_exact:
            # Few rows: the date hierarchy reads their dates rather than probing the index.
            self.queryset._django_scale_few_rows = int(count) <= paginator.count_threshold
        can_show_all = count.is_exact and int(count) <= self.list_max_show_all
        if self.show_all and can_show_all:
            result_list: Any = self.queryset._clone()
            multi_page = int(count) > self.list_per_page
        else:
            result_list = page.object_list
            multi_page = page.has_next() or page.number > 1
        # The page may have corrected an estimate that promised more rows than there are.
        self.result_count = paginator.count
        # Never COUNT(*) the unfiltered table for "N results (M total)".
        self.show_full_result_count = False
        self.show_admin_actions = True
        self.full_result_count = None
        self.result_list = result_list
        self.can_show_all = can_show_all
        self.multi_page = multi_page
        self.paginator = paginator

    def _show_timed_out(self, request: HttpRequest, paginator: ApproxCountPaginator) -> None:
        """Show an empty page and say why: the rows took longer than the page's time limit."""
        seconds = current_statement_timeout(self.queryset.db)
        user_messages.warning(
            request,
            gettext(
                "Listing these rows took longer than %(seconds)s seconds and was stopped. "
                "Narrow the list with a filter or a search."
            )
            % {"seconds": f"{seconds:g}"},
        )
        paginator.__dict__["count"] = ApproxCount(0, "capped")
        self.result_count = paginator.count
        self.show_full_result_count = False
        self.full_result_count = None
        self.result_list = self.queryset.none()
        self.can_show_all = False
        self.multi_page = self.page_num > 1
        self.paginator = paginator


# ModelAdmin is generic only in django-stubs; subscripting it fails at run time.
class ScaleModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A ``ModelAdmin`` for big tables and replicas.

    * The changelist counts with :func:`~django_scale.counting.approx_count` (no ``COUNT(*)``
      over a big table), shows counts as "≈ 12.3 million" or "10,000+", and always fetches a
      ``LIMIT``ed page through :class:`~django_scale.paginator.ApproxCountPaginator`.
    * GET pages read from a replica; POSTs load and save on the primary.
    """

    paginator = ApproxCountPaginator
    #: Counting the unfiltered table for "N results (M total)" is what this class avoids.
    show_full_result_count = False

    if hasattr(admin, "ShowFacets"):
        # Django 5.0+: facets count every choice over the filtered table on every load.
        show_facets = admin.ShowFacets.NEVER

    checks_class = ScaleModelAdminChecks

    #: Seconds any one SQL statement of an admin page may run before the database cancels
    #: it (``None``: no limit), on every database the page uses. The changelist falls back
    #: when a statement runs out of time: no count, no choices for a filter, no date
    #: hierarchy, or an empty list with a message; the rest of the page still renders. Under
    #: ``ATOMIC_REQUESTS`` each of those statements runs in a savepoint, so the request's
    #: transaction survives the cancelled statement.
    statement_timeout: float | None = 10.0

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ScaleChangeList

    def get_list_filter(self, request: HttpRequest) -> Any:
        """Give plain-field filters choices from statistics instead of a full ``DISTINCT``."""
        filters = []
        for entry in super().get_list_filter(request):
            if isinstance(entry, str) and _uses_all_values_filter(self.model, entry):
                entry = (entry, ScaleAllValuesFieldListFilter)
            elif isinstance(entry, str) and _uses_related_filter(self.model, entry):
                entry = (entry, ScaleRelatedFieldListFilter)
            filters.append(entry)
        return filters

    def get_statement_timeout(self, request: HttpRequest) -> float | None:
        """Return the :attr:`statement_timeout` for *request*'s page; override to vary it."""
        return self.statement_timeout

    def _limited(self, request: HttpRequest, view: Callable[[], HttpResponse]) -> HttpResponse:
        """Run *view* and render its response under the page's statement timeout, on every alias."""
        with statement_timeout(self.get_statement_timeout(request)):
            response = view()
            if isinstance(response, SimpleTemplateResponse):
                # The template queries too (the date hierarchy, list_display callables).
                response.render()
        return response

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method in SAFE_METHODS:
            # Django 4.2 opens a transaction on the primary even to show the form, which
            # would keep every read of the page off the replicas.
            return self._limited(
                request,
                lambda: self._changeform_view(request, object_id, form_url, extra_context),  # type: ignore[attr-defined]
            )

        def save() -> HttpResponse:
            with use_primary(), transaction.atomic(using=router.db_for_write(self.model)):
                return self._changeform_view(request, object_id, form_url, extra_context)  # type: ignore[attr-defined, no-any-return]

        return self._limited(request, save)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method in SAFE_METHODS:
            return self._limited(request, lambda: self._delete_view(request, object_id, extra_context))  # type: ignore[attr-defined]

        def delete() -> HttpResponse:
            with use_primary(), transaction.atomic(using=router.db_for_write(self.model)):
                return self._delete_view(request, object_id, extra_context)  # type: ignore[attr-defined, no-any-return]

        return self._limited(request, delete)

    def history_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return self._limited(
            request, lambda: super(ScaleModelAdmin, self).history_view(request, object_id, extra_context)
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method in SAFE_METHODS:
            return self._limited(
                request, lambda: super(ScaleModelAdmin, self).changelist_view(request, extra_context)
            )

        def act() -> HttpResponse:
            # Actions and list_editable saves act on rows as the primary has them.
            with use_primary():
                return super(ScaleModelAdmin, self).changelist_view(request, extra_context)

        return self._limited(request, act)
