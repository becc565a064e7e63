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

from collections.abc import Callable
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.db import router, transaction
from django.http import HttpRequest, HttpResponse
from django.template.response import SimpleTemplateResponse

from django_scale.admin.changelist import ScaleChangeList
from django_scale.admin.checks import ScaleModelAdminChecks
from django_scale.admin.filters import (
    ScaleAllValuesFieldListFilter,
    ScaleRelatedFieldListFilter,
    uses_all_values_filter,
    uses_related_filter,
)
from django_scale.paginator import ApproxCountPaginator
from django_scale.replicas import use_primary
from django_scale.timeouts import statement_timeout

__all__ = ["SAFE_METHODS", "ScaleModelAdmin"]

#: Methods that never write, whose pages may be read from a replica.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

#: The changelist template that renders the date hierarchy with ``{% scale_date_hierarchy %}``;
#: it extends the template Django would have used.
CHANGE_LIST_TEMPLATE = "django_scale/admin/change_list.html"


# ModelAdmin is generic only in django-stubs; subscripting it fails at run time.
class ScaleModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A ``ModelAdmin`` for big tables and replicas.

    * The changelist counts with :func:`~django_scale.counting.approx_count` (no ``COUNT(*)``
      over a big table), shows counts as "≈ 12.3 million" or "10,000+", and always fetches a
      ``LIMIT``-ed page through :class:`~django_scale.paginator.ApproxCountPaginator`.
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
            if isinstance(entry, str) and uses_all_values_filter(self.model, entry):
                entry = (entry, ScaleAllValuesFieldListFilter)
            elif isinstance(entry, str) and uses_related_filter(self.model, entry):
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
                request,
                lambda: self._with_date_hierarchy(
                    super(ScaleModelAdmin, self).changelist_view(request, extra_context)
                ),
            )

        def act() -> HttpResponse:
            # Actions and list_editable saves act on rows as the primary has them.
            with use_primary():
                return self._with_date_hierarchy(
                    super(ScaleModelAdmin, self).changelist_view(request, extra_context)
                )

        return self._limited(request, act)

    def _with_date_hierarchy(self, response: HttpResponse) -> HttpResponse:
        """Render the changelist's date hierarchy with ``{% scale_date_hierarchy %}``.

        Django's ``{% date_hierarchy %}`` lists periods with a ``DISTINCT`` over every row.
        The response is rendered with :data:`CHANGE_LIST_TEMPLATE` instead, which extends
        the template Django chose (``change_list_template`` or ``admin/<app>/<model>/...``,
        so a project's overrides still apply) and replaces its ``date_hierarchy`` block.
        """
        if not isinstance(response, SimpleTemplateResponse) or response.is_rendered:
            return response
        context = response.context_data
        changelist = context.get("cl") if isinstance(context, dict) else None
        if context is None or not getattr(changelist, "date_hierarchy", None):
            return response
        context["django_scale_change_list"] = response.resolve_template(response.template_name)
        response.template_name = CHANGE_LIST_TEMPLATE
        return response
