"""``ApproxCountPaginator``: pages from an approximate count, rows from the database.

The count only sizes the page links ("page 12 of ≈ 3,300"). What a page shows comes from one
``LIMIT per_page + 1`` query: the extra row says whether there is a next page, so a count that
is too high never produces an empty page and one that is too low never hides rows: pages past
the estimated end are served while they have rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from django.core.paginator import EmptyPage, Page, PageNotAnInteger, Paginator
from django.db.models import Q, QuerySet
from django.utils.translation import gettext

from django_scale import keyset
from django_scale.counting import DEFAULT_BUDGET, DEFAULT_CAP, DEFAULT_THRESHOLD, ApproxCount, approx_count
from django_scale.exceptions import ArgumentError

__all__ = ["ApproxCountPaginator", "ApproxPage"]


# Page and Paginator are generic only in django-stubs; subscripting them fails at run time.
class ApproxPage(Page):  # type: ignore[type-arg]
    """A page that knows whether another follows from the rows it fetched, not from the count."""

    def __init__(
        self, object_list: Sequence[Any], number: int, paginator: ApproxCountPaginator, has_more: bool
    ):
        super().__init__(object_list, number, paginator)
        self._has_more = has_more

    def has_next(self) -> bool:
        return self._has_more

    def next_page_number(self) -> int:
        if not self._has_more:
            raise EmptyPage(gettext("That page contains no results"))
        return self.number + 1

    def end_index(self) -> int:
        if not self.object_list:
            return 0
        return (self.number - 1) * self.paginator.per_page + len(self.object_list)

    def __repr__(self) -> str:
        paginator = self.paginator
        pages = (
            paginator.num_pages_display
            if isinstance(paginator, ApproxCountPaginator)
            else paginator.num_pages
        )
        return f"<Page {self.number} of {pages}>"


class ApproxCountPaginator(Paginator):  # type: ignore[type-arg]
    """A ``Paginator`` for big querysets: an approximate count, and every page fetched with ``LIMIT``.

    ``count`` is an :class:`~django_scale.counting.ApproxCount` (an ``int`` that renders as
    ``"≈ 12.3 million"``); ``num_pages`` follows from it but never hides the page being shown
    or the one after it.
    """

    #: Passed to :func:`~django_scale.counting.approx_count`: exact below this many rows.
    count_threshold = DEFAULT_THRESHOLD
    #: Passed to :func:`~django_scale.counting.approx_count`: a capped count stops here ("10,000+").
    count_cap = DEFAULT_CAP
    #: Passed to :func:`~django_scale.counting.approx_count`: seconds a capped count may take.
    count_budget = DEFAULT_BUDGET
    #: Passed to :func:`~django_scale.counting.approx_count` as ``statistics``: ``False`` for a
    #: queryset that hides some of its table's rows (``ScaleChangeList`` sets it then), whose
    #: count must not be estimated from statistics of the whole table.
    count_statistics = True
    #: Passed to :func:`~django_scale.counting.approx_count` as ``cached``: count through the
    #: query cache (the queryset needs ``cached()``, and ``QUERY_CACHE`` on), so the count of a
    #: search or filter shown again while none of its table's rows changed costs no query.
    count_cached = False

    def __init__(
        self,
        object_list: Any,
        per_page: int | str,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
        **kwargs: Any,
    ):
        # Orphans would need the exact number of rows on the last page.
        super().__init__(object_list, per_page, 0, allow_empty_first_page, **kwargs)
        self._furthest = 0
        self._links_up_to = 0

    @cached_property
    def count(self) -> ApproxCount:
        """The number of rows: exact when small, else estimated (see ``approx_count()``)."""
        if isinstance(self.object_list, QuerySet):
            return approx_count(
                self.object_list,
                threshold=self.count_threshold,
                cap=self.count_cap,
                budget=self.count_budget,
                statistics=self.count_statistics,
                cached=self.count_cached,
            )
        return ApproxCount(len(self.object_list), "exact")

    @property
    def num_pages(self) -> int:
        """Pages by the count, but at least up to the furthest page known to have rows."""
        if self._links_up_to:
            return self._links_up_to
        count = int(self.count)
        pages = 1 if count == 0 and self.allow_empty_first_page else math.ceil(count / self.per_page)
        return max(pages, self._furthest, 1 if self.allow_empty_first_page else 0)

    @property
    def num_pages_display(self) -> str:
        """``num_pages`` as a page should show it: ``"3,300"`` or ``"≈ 3,300"``."""
        return str(ApproxCount(self.num_pages, "exact" if self.count.is_exact else "estimate"))

    def validate_number(self, number: Any) -> int:
        """Accept any positive page number: whether it has rows is found by fetching it."""
        try:
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            number = int(number)
        except (TypeError, ValueError) as exc:  # noqa: PERF203
            raise PageNotAnInteger(gettext("That page number is not an integer")) from exc
        if number < 1:
            raise EmptyPage(gettext("That page number is less than 1"))
        return int(number)

    def page(self, number: Any, after: Q | Sequence[Any] | Any = None) -> ApproxPage:
        """Return page *number*, fetched with ``LIMIT per_page + 1``; ``EmptyPage`` past the rows.

        With *after* (keyset pagination), the page is read from the row after the previous
        page's last one instead of with an ``OFFSET``, which reads and throws away every row
        before it. *after* is either that row's values of the queryset's ordering fields (a
        list or tuple, see :func:`django_scale.keyset.ordering_keys`), or the condition
        :func:`django_scale.keyset.after` built from them.
        """
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        source: Any = self.object_list
        if isinstance(after, (list, tuple)):
            keys = keyset.ordering_keys(source)
            if keys is None:
                raise ArgumentError("page(after=values) needs a queryset ordered by fields of its model.")
            source = keyset.rows_after(source, keys, after)
        elif after is not None:
            source = source.filter(after)
        start = bottom if after is None else 0
        fetched = source[start : start + self.per_page + 1]
        rows = list(fetched)
        has_more = len(rows) > self.per_page
        rows = rows[: self.per_page]
        object_list: Any = rows
        if isinstance(self.object_list, QuerySet):
            # Hand out a queryset, as Django's Paginator does (the admin builds list_editable
            # formsets from it), already holding the rows fetched above: no second query.
            object_list = source[start : start + self.per_page]
            # QuerySet._result_cache and _prefetch_done are the queryset's own cache of its
            # rows (django/db/models/query.py, QuerySet.__init__ and _fetch_all, the same in
            # 4.2 to 6.1); test_paginator's test_the_page_is_a_queryset_that_does_not_query_again
            # pins that the page does not query again.
            object_list._result_cache = rows
            object_list._prefetch_done = True
        if not rows and not (number == 1 and self.allow_empty_first_page):
            raise EmptyPage(gettext("That page contains no results"))
        self._furthest = max(self._furthest, number + 1 if has_more else number)
        if not has_more and (rows or number == 1):
            # The last page: the rows before it and on it are the exact count, whatever an
            # estimate said, and no count query is needed at all if none ran yet.
            known = self.__dict__.get("count")
            if known is None or not known.is_exact:
                self.__dict__["count"] = ApproxCount(bottom + len(rows), "exact")
        return ApproxPage(object_list, number, self, has_more)

    def get_elided_page_range(
        self, number: int | float | str = 1, *, on_each_side: int = 3, on_ends: int = 2
    ) -> Any:
        """Page links; with an estimated count, only up to the furthest page known to have rows.

        A link past the real end of the rows would lead to an empty page, and an estimate may
        be far too high: further pages are reached by following "next".
        """
        if self.count.is_exact:
            return super().get_elided_page_range(number, on_each_side=on_each_side, on_ends=on_ends)
        number = self.validate_number(number)
        known = max(self._furthest, number)
        self._links_up_to = known
        try:
            return list(super().get_elided_page_range(number, on_each_side=on_each_side, on_ends=on_ends))
        finally:
            self._links_up_to = 0

    def _get_page(self, *args: Any, **kwargs: Any) -> ApproxPage:
        return ApproxPage(*args, **kwargs)
