"""``ScaleChangeList``: approximate counts, pages fetched with ``LIMIT`` and keyset next links."""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Any

from django.contrib import messages as user_messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.core import signing
from django.core.exceptions import ValidationError
from django.core.paginator import InvalidPage
from django.http import HttpRequest
from django.utils.translation import gettext

from django_scale import keyset
from django_scale.admin.date_hierarchy import DateHierarchy
from django_scale.admin.fallback import or_fallback
from django_scale.admin.filters import create_filter, selects_whole_table
from django_scale.counting import ApproxCount
from django_scale.paginator import ApproxCountPaginator
from django_scale.timeouts import current_statement_timeout

__all__ = ["CURSOR_VAR", "ScaleChangeList"]

#: The query parameter that carries a signed keyset cursor to the next page.
CURSOR_VAR = "_after"
_CURSOR_SALT = "django_scale.admin.cursor"


class ScaleChangeList(ChangeList):
    """A ``ChangeList`` that counts approximately and always fetches its page with ``LIMIT``.

    Django's own shows the whole queryset, with no ``LIMIT``, when the count says everything
    fits on one page; with an estimate that is too low that would load the whole table.
    """

    #: The signed cursor that the link to the next page carries, if keyset can serve it.
    _next_cursor: str | None = None
    #: Whether the rows are known to be few (an exact count under the paginator's
    #: threshold): the date hierarchy then reads their values instead of probing.
    few_rows = False

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

    @cached_property
    def date_hierarchy_periods(self) -> DateHierarchy | None:
        """The periods of :attr:`date_hierarchy` that have rows, found by probes (read once)."""
        if not self.date_hierarchy:
            return None
        return DateHierarchy(self.queryset, self.date_hierarchy, few_rows=self.few_rows)

    def _cursor_filter(self, request: HttpRequest, keys: list[keyset.Key] | None, fingerprint: str) -> Any:
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
            return keyset.after(keys, values, using=self.queryset.db)
        except ValidationError:
            return None

    def get_filters(self, request: HttpRequest) -> Any:
        """Django's filters, with a field name's filter created by :func:`create_filter`.

        ``list_filter`` (``cl.list_filter``, ``get_list_filter()``) stays what the admin
        wrote; only the class chosen for a bare field name differs, where Django calls
        ``FieldListFilter.create()``.
        """
        written = self.list_filter
        scaled: Any = [(entry, create_filter) if isinstance(entry, str) else entry for entry in written]
        self.list_filter = scaled
        try:
            return super().get_filters(request)
        finally:
            self.list_filter = written

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
        # No keyset through a nullable field: value_to_string() cannot carry a NULL.
        keys = keyset.ordering_keys(self.queryset, nullable=False)
        fingerprint = self._fingerprint(request)
        after = self._cursor_filter(request, keys, fingerprint)
        alias = self.queryset.db
        try:
            page = or_fallback(
                alias, lambda: paginator.page(self.page_num, after=after), lambda: None, "changelist page"
            )
        except InvalidPage as exc:
            raise IncorrectLookupParameters from exc
        if page is None:
            self._show_timed_out(request, paginator)
            return
        rows = list(page.object_list)
        if keys and rows and page.has_next():
            values = [key.field.value_to_string(rows[-1]) for key in keys]
            self._next_cursor = signing.dumps(
                {"p": self.page_num + 1, "k": values, "f": fingerprint}, salt=_CURSOR_SALT, compress=True
            )
        count = or_fallback(
            alias,
            lambda: paginator.count,
            # At least the rows up to the end of this page, and one more on the next.
            lambda: ApproxCount(self.page_num * self.list_per_page, "capped"),
            "count",
        )
        paginator.__dict__["count"] = count
        # Few rows: the date hierarchy reads their dates rather than probing the index.
        self.few_rows = count.is_exact and int(count) <= paginator.count_threshold
        can_show_all = count.is_exact and int(count) <= self.list_max_show_all
        if self.show_all and can_show_all:
            result_list: Any = self.queryset._clone()
            multi_page = int(count) > self.list_per_page
        else:
            result_list = page.object_list
            multi_page = page.has_next() or page.number > 1
        # The page may have corrected an estimate that promised more rows than there are.
        self.result_count = paginator.count
        self._full_count()
        self.result_list = result_list
        self.can_show_all = can_show_all
        self.multi_page = multi_page
        self.paginator = paginator

    def _full_count(self) -> None:
        """The "N results (M total)" count, exact as Django's, if the admin asks for it.

        ``ScaleModelAdmin`` does not (``show_full_result_count = False``); one that sets it
        back to ``True`` gets Django's ``COUNT(*)`` of the unfiltered rows, under the page's
        time limit (out of time: no total shown).
        """
        full: int | None = None
        if self.model_admin.show_full_result_count:
            root = self.root_queryset
            full = or_fallback(root.db, root.count, lambda: None, "full result count")
        self.show_full_result_count = full is not None
        # As Django: actions show when the total is not counted or is not zero.
        self.show_admin_actions = not self.show_full_result_count or bool(full)
        self.full_result_count = full

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
        self._full_count()
        self.result_list = self.queryset.none()
        self.can_show_all = False
        self.multi_page = self.page_num > 1
        self.paginator = paginator
