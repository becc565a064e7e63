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

from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import InvalidPage
from django.db import router, transaction
from django.http import HttpRequest, HttpResponse

from django_scale.paginator import ApproxCountPaginator
from django_scale.replicas import use_primary

__all__ = ["ScaleChangeList", "ScaleModelAdmin"]

#: Methods that never write, whose pages may be read from a replica.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class ScaleChangeList(ChangeList):
    """A ``ChangeList`` that counts approximately and always fetches a ``LIMIT``ed page.

    Django's own shows the whole queryset, with no ``LIMIT``, when the count says everything
    fits on one page; with an estimate that is too low that would load the whole table.
    """

    def get_results(self, request: HttpRequest) -> None:
        paginator = self.model_admin.get_paginator(request, self.queryset, self.list_per_page)
        if not isinstance(paginator, ApproxCountPaginator):
            super().get_results(request)
            return
        count = paginator.count
        can_show_all = count.is_exact and int(count) <= self.list_max_show_all
        if self.show_all and can_show_all:
            result_list: Any = self.queryset._clone()
            multi_page = int(count) > self.list_per_page
        else:
            try:
                page = paginator.page(self.page_num)
            except InvalidPage as exc:
                raise IncorrectLookupParameters from exc
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

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ScaleChangeList

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
            return self._changeform_view(request, object_id, form_url, extra_context)  # type: ignore[attr-defined, no-any-return]
        with use_primary(), transaction.atomic(using=router.db_for_write(self.model)):
            return self._changeform_view(request, object_id, form_url, extra_context)  # type: ignore[attr-defined, no-any-return]

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method in SAFE_METHODS:
            return self._delete_view(request, object_id, extra_context)  # type: ignore[attr-defined, no-any-return]
        with use_primary(), transaction.atomic(using=router.db_for_write(self.model)):
            return self._delete_view(request, object_id, extra_context)  # type: ignore[attr-defined, no-any-return]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method in SAFE_METHODS:
            return super().changelist_view(request, extra_context)
        # Actions and list_editable saves act on rows as the primary has them.
        with use_primary():
            return super().changelist_view(request, extra_context)
