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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import csrf_protect

from django_scale.admin.changelist import ScaleChangeList
from django_scale.admin.checks import ScaleModelAdminChecks
from django_scale.admin.filters import SAFE_METHODS
from django_scale.admin.responses import guard_rendering
from django_scale.paginator import ApproxCountPaginator
from django_scale.replicas import use_primary
from django_scale.timeouts import statement_timeout

__all__ = ["SAFE_METHODS", "ScaleModelAdmin"]

# Django's admin views are decorated so (django/contrib/admin/options.py); the views this
# class replaces keep it, so calling them directly (from a subclass) still checks CSRF.
csrf_protect_m = method_decorator(csrf_protect)


# ModelAdmin is generic only in django-stubs; subscripting it fails at run time.
class ScaleModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A ``ModelAdmin`` for big tables and replicas.

    * The changelist counts with :func:`~django_scale.counting.approx_count` (no ``COUNT(*)``
      over a big table), shows counts as "≈ 12.3 million" or "10,000+", and always fetches a
      ``LIMIT``-ed page through :class:`~django_scale.paginator.ApproxCountPaginator`.
    * Filters on a field name list their choices without scanning a big table
      (:func:`~django_scale.admin.filters.create_filter`).
    * GET pages read from a replica; POSTs load and save on the primary.
    """

    paginator = ApproxCountPaginator
    #: Counting the unfiltered table for "N results (M total)" is what this class avoids;
    #: set it to ``True`` for Django's exact ``COUNT(*)`` of the unfiltered rows.
    show_full_result_count = False

    if hasattr(admin, "ShowFacets"):
        # Django 5.0+: facets count every choice over the filtered table on every load.
        show_facets = admin.ShowFacets.NEVER

    checks_class = ScaleModelAdminChecks

    #: Seconds any one SQL statement of an admin page may run before the database cancels
    #: it (``None``: no limit), on every database the page uses, while the view runs and
    #: while its response renders. The changelist falls back when a statement runs out of
    #: time: no count, no choices for a filter, no date hierarchy, or an empty list with a
    #: message; the rest of the page still renders. Under ``ATOMIC_REQUESTS`` each of those
    #: statements runs in a savepoint, so the request's transaction survives the cancelled
    #: statement.
    statement_timeout: float | None = 10.0

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ScaleChangeList

    def get_statement_timeout(self, request: HttpRequest) -> float | None:
        """Return the :attr:`statement_timeout` for *request*'s page; override to vary it."""
        return self.statement_timeout

    def _guarded(
        self,
        request: HttpRequest,
        view: Callable[[], HttpResponse],
        *,
        primary: bool = False,
        date_hierarchy: bool = False,
    ) -> HttpResponse:
        """Run *view* under the page's statement timeout; its response renders under it too.

        With *primary*, the view and the rendering read from the primary (a POST's page).
        """
        seconds = self.get_statement_timeout(request)

        @contextmanager
        def guard() -> Iterator[None]:
            with statement_timeout(seconds):
                if primary:
                    with use_primary():
                        yield
                else:
                    yield

        with guard():
            response = view()
        return guard_rendering(response, request, guard, date_hierarchy=date_hierarchy)

    @csrf_protect_m
    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method in SAFE_METHODS:
            # Django 4.2 opens a transaction on the primary even to show the form (and the
            # delete confirmation), which would keep every read of the page off the replicas;
            # later Djangos call _changeform_view() / _delete_view() for a GET as this does.
            # Both are private (django/contrib/admin/options.py, present from 4.2 to 6.1);
            # test_admin.py's test_a_post_loads_the_object_from_the_primary_and_keeps_newer_columns
            # and test_admin_dropin.py's GET views pin them on every Django.
            return self._guarded(
                request,
                lambda: self._changeform_view(request, object_id, form_url, extra_context),  # type: ignore[attr-defined]
            )

        # Django's own view: the object is loaded and saved in its transaction, on the primary.
        return self._guarded(
            request,
            lambda: super(ScaleModelAdmin, self).changeform_view(request, object_id, form_url, extra_context),
            primary=True,
        )

    @csrf_protect_m
    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method in SAFE_METHODS:
            return self._guarded(request, lambda: self._delete_view(request, object_id, extra_context))  # type: ignore[attr-defined]

        return self._guarded(
            request,
            lambda: super(ScaleModelAdmin, self).delete_view(request, object_id, extra_context),
            primary=True,
        )

    def history_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return self._guarded(
            request, lambda: super(ScaleModelAdmin, self).history_view(request, object_id, extra_context)
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # Actions and list_editable saves (POSTs) act on rows as the primary has them.
        return self._guarded(
            request,
            lambda: super(ScaleModelAdmin, self).changelist_view(request, extra_context),
            primary=request.method not in SAFE_METHODS,
            date_hierarchy=True,
        )
