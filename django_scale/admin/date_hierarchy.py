"""The date hierarchy by index probes instead of a ``DISTINCT`` over the table.

Django's ``{% date_hierarchy %}`` tag lists the years (months, days) that have rows with
``SELECT DISTINCT date_trunc(...)`` over every matching row. :class:`DateHierarchy` finds the
first and last value (two index lookups with an index on the field) and asks, for each period
in between, whether a row exists in it: at most :data:`MAX_PERIOD_PROBES` cheap probes.
``ScaleModelAdmin`` renders it with its own tag, ``{% scale_date_hierarchy cl %}`` (library
``scale_admin``), in the ``date_hierarchy`` block of the changelist template; the links and
the ``admin/date_hierarchy.html`` template it renders are Django's.
"""

from __future__ import annotations

import datetime
from functools import cached_property
from typing import Any

from django.conf import settings
from django.contrib.admin.utils import get_fields_from_path
from django.db import models
from django.db.models import QuerySet
from django.utils import formats, timezone
from django.utils.text import capfirst
from django.utils.translation import gettext as _

from django_scale.admin.fallback import or_fallback
from django_scale.exceptions import ArgumentError

__all__ = ["MAX_PERIOD_PROBES", "DateHierarchy", "date_hierarchy"]

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


class DateHierarchy:
    """The periods of *queryset* that have rows in the date or datetime field *field_name*.

    Each answer is read once: the bounds are shared by the choice of the starting level and
    the probes. When the rows are known to be few (*few_rows*: an exact count under the
    paginator's threshold, such as a search for a rare word), their values are read instead:
    on a big table ``MIN()`` of a filter the planner cannot estimate walks the field's index
    until a row matches, which for a rare word is the whole table. A statement that runs out
    of the page's time makes the hierarchy empty.
    """

    def __init__(self, queryset: QuerySet[Any], field_name: str, *, few_rows: bool = False) -> None:
        self.queryset = queryset
        self.field_name = field_name
        self.few_rows = few_rows
        field = get_fields_from_path(queryset.model, field_name)[-1]
        #: Whether the field holds datetimes (periods start at local midnight) or dates.
        self.as_datetimes = isinstance(field, models.DateTimeField)

    @cached_property
    def _values(self) -> list[Any]:
        # No ORDER BY and no LIMIT: nothing tempts the planner into walking an index.
        values = self.queryset.order_by().values_list(self.field_name, flat=True)
        return [value for value in values if value is not None]

    @cached_property
    def _bounds(self) -> tuple[Any, Any]:
        def compute() -> tuple[Any, Any]:
            if self.few_rows:
                values = self._values
                return min(values, default=None), max(values, default=None)
            found = self.queryset.aggregate(
                first=models.Min(self.field_name), last=models.Max(self.field_name)
            )
            return found["first"], found["last"]

        return or_fallback(self.queryset.db, compute, lambda: (None, None), "date hierarchy")

    def bounds(self) -> tuple[Any, Any]:
        """Return the first and last value of the field (``(None, None)`` without rows)."""
        return self._bounds

    def periods(self, kind: str, order: str = "ASC") -> list[Any]:
        """Return the start of each *kind* (``"year"``, ``"month"``, ``"day"``) that has rows.

        Like ``QuerySet.dates()`` / ``datetimes()``: dates, or datetimes at the current time
        zone's midnight.
        """
        if kind not in ("year", "month", "day"):
            raise ArgumentError(f"kind must be 'year', 'month' or 'day', not {kind!r}.")
        found = or_fallback(self.queryset.db, lambda: self._probe(kind), list, "date hierarchy")
        return found if order == "ASC" else found[::-1]

    def _start(self, day: datetime.date) -> Any:
        if not self.as_datetimes:
            return day
        moment = datetime.datetime(day.year, day.month, day.day)
        return timezone.make_aware(moment, self._zone) if self._zone else moment

    @cached_property
    def _zone(self) -> Any:
        return timezone.get_current_timezone() if self.as_datetimes and settings.USE_TZ else None

    def _day(self, value: Any) -> datetime.date:
        if self.as_datetimes and self._zone:
            value = timezone.localtime(value, self._zone)
        return value.date() if isinstance(value, datetime.datetime) else value

    def _probe(self, kind: str) -> list[Any]:
        first, last = self.bounds()
        if first is None or last is None:
            return []
        if self.few_rows:
            seen = set()
            for value in self._values:
                day = self._day(value)
                seen.add(
                    datetime.date(day.year, 1, 1)
                    if kind == "year"
                    else datetime.date(day.year, day.month, 1)
                    if kind == "month"
                    else day
                )
            return [self._start(start) for start in sorted(seen)]
        starts = _period_starts(self._day(first), self._day(last), kind)
        found = []
        for start in starts:
            lookups = {
                f"{self.field_name}__gte": self._start(start),
                f"{self.field_name}__lt": self._start(_next_start(start, kind)),
            }
            if len(starts) > MAX_PERIOD_PROBES or self.queryset.filter(**lookups).exists():
                found.append(self._start(start))
        return found


def date_hierarchy(cl: Any) -> dict[str, Any]:
    """Return the context of ``admin/date_hierarchy.html`` for the changelist *cl*.

    The same links and titles as Django's own ``date_hierarchy`` tag function
    (``django/contrib/admin/templatetags/admin_list.py``), with the periods from *cl*'s
    :class:`DateHierarchy` (``cl.date_hierarchy_periods`` of a ``ScaleChangeList``; one built
    here for another ``ChangeList``). An empty dict when *cl* has no date hierarchy.
    """
    if not cl.date_hierarchy:
        return {}
    field_name = cl.date_hierarchy
    hierarchy = getattr(cl, "date_hierarchy_periods", None)
    if not isinstance(hierarchy, DateHierarchy):
        hierarchy = DateHierarchy(cl.queryset, field_name)
    field = get_fields_from_path(cl.model, field_name)[-1]
    year_field = f"{field_name}__year"
    month_field = f"{field_name}__month"
    day_field = f"{field_name}__day"
    field_generic = f"{field_name}__"
    year_lookup = cl.params.get(year_field)
    month_lookup = cl.params.get(month_field)
    day_lookup = cl.params.get(day_field)
    shown = {"show": True, "field_name": field.verbose_name}

    def link(filters: dict[str, Any]) -> str:
        return str(cl.get_query_string(filters, [field_generic]))

    if not (year_lookup or month_lookup or day_lookup):
        # Select the starting level: a single year or month opens at its months or days.
        first, last = hierarchy.bounds()
        if first and last:
            if hierarchy.as_datetimes:
                first, last = (timezone.localtime(v) if timezone.is_aware(v) else v for v in (first, last))
            if first.year == last.year:
                year_lookup = first.year
                if first.month == last.month:
                    month_lookup = first.month

    if year_lookup and month_lookup and day_lookup:
        day = datetime.date(int(year_lookup), int(month_lookup), int(day_lookup))
        return {
            **shown,
            "back": {
                "link": link({year_field: year_lookup, month_field: month_lookup}),
                "title": capfirst(formats.date_format(day, "YEAR_MONTH_FORMAT")),
            },
            "choices": [{"title": capfirst(formats.date_format(day, "MONTH_DAY_FORMAT"))}],
        }
    if year_lookup and month_lookup:
        return {
            **shown,
            "back": {"link": link({year_field: year_lookup}), "title": str(year_lookup)},
            "choices": [
                {
                    "link": link({year_field: year_lookup, month_field: month_lookup, day_field: day.day}),
                    "title": capfirst(formats.date_format(day, "MONTH_DAY_FORMAT")),
                }
                for day in hierarchy.periods("day")
            ],
        }
    if year_lookup:
        return {
            **shown,
            "back": {"link": link({}), "title": _("All dates")},
            "choices": [
                {
                    "link": link({year_field: year_lookup, month_field: month.month}),
                    "title": capfirst(formats.date_format(month, "YEAR_MONTH_FORMAT")),
                }
                for month in hierarchy.periods("month")
            ],
        }
    return {
        **shown,
        "back": None,
        "choices": [
            {"link": link({year_field: str(year.year)}), "title": str(year.year)}
            for year in hierarchy.periods("year")
        ],
    }
