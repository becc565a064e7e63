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
from django.db import router, transaction
from django.http import HttpRequest, HttpResponse

from django_scale.replicas import use_primary

__all__ = ["ScaleModelAdmin"]

#: Methods that never write, whose pages may be read from a replica.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


# ModelAdmin is generic only in django-stubs; subscripting it fails at run time.
class ScaleModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A ``ModelAdmin`` whose GET pages read from replicas and whose POSTs use the primary."""

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
