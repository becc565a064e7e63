"""The admin's pages render under the page's guard, lazily, as Django's do.

Django's admin views return an unrendered ``TemplateResponse``: a subclass's
``changelist_view()`` may change its ``context_data`` or ``template_name`` after calling
``super()``, and ``process_template_response()`` middleware may too; the handler renders it
last. The template queries as well (the date hierarchy, ``list_display`` callables, "show
all"), so the page's guard (its statement timeout, and the primary for a POST) must cover the
rendering. :func:`guard_rendering` returns the view's response as a
:class:`GuardedTemplateResponse`, which enters the guard when it renders.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.template.response import SimpleTemplateResponse, TemplateResponse

__all__ = ["CHANGE_LIST_TEMPLATE", "GuardedTemplateResponse", "guard_rendering"]

#: The changelist template that renders the date hierarchy with ``{% scale_date_hierarchy %}``;
#: it extends the template Django would have used.
CHANGE_LIST_TEMPLATE = "django_scale/admin/change_list.html"

Guard = Callable[[], AbstractContextManager[Any]]


class GuardedTemplateResponse(TemplateResponse):
    """A ``TemplateResponse`` whose rendering runs inside a guard (a context manager).

    With ``date_hierarchy=True`` (the changelist), a changelist that has a date hierarchy is
    rendered with :data:`CHANGE_LIST_TEMPLATE`, which extends the template resolved from
    ``template_name`` (whatever it is when the response renders) and replaces its
    ``date_hierarchy`` block: Django's ``{% date_hierarchy %}`` lists periods with a
    ``DISTINCT`` over every row.
    """

    # Dropped when a rendered response is pickled (a cache), as Django drops its own.
    rendering_attrs = [
        *TemplateResponse.rendering_attrs,
        "_django_scale_request",
        "_django_scale_guard",
        "_django_scale_date_hierarchy",
    ]

    def __init__(
        self, request: HttpRequest, *args: Any, guard: Guard, date_hierarchy: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(request, *args, **kwargs)
        self._django_scale_request = request
        self._django_scale_guard = guard
        self._django_scale_date_hierarchy = date_hierarchy

    @property
    def rendered_content(self) -> str:
        """Render as ``SimpleTemplateResponse.rendered_content`` does, inside the guard."""
        with self._django_scale_guard():
            template: Any = self.resolve_template(self.template_name)
            context = self.resolve_context(self.context_data)
            changelist = context.get("cl") if isinstance(context, dict) else None
            if self._django_scale_date_hierarchy and getattr(changelist, "date_hierarchy", None):
                context = {**(context or {}), "django_scale_change_list": template}
                template = self.resolve_template(CHANGE_LIST_TEMPLATE)
            return str(template.render(context, self._django_scale_request))


def guard_rendering(
    response: HttpResponse, request: HttpRequest, guard: Guard, *, date_hierarchy: bool = False
) -> HttpResponse:
    """Return *response*, rendered later under *guard*: a :class:`GuardedTemplateResponse`.

    An unrendered ``TemplateResponse`` (what Django's admin views return) is returned as a
    ``GuardedTemplateResponse`` with the same template, context, status, headers and
    cookies. Any other template response (a project's own subclass) is rendered now, under
    *guard*; other responses are returned as they are.
    """
    if not isinstance(response, SimpleTemplateResponse) or response.is_rendered:
        return response
    if type(response) is not TemplateResponse:
        with guard():
            return response.render()
    guarded = GuardedTemplateResponse(
        request,
        response.template_name,
        response.context_data,
        status=response.status_code,
        charset=response.charset,
        using=response.using,
        headers=response.headers,
        guard=guard,
        date_hierarchy=date_hierarchy,
    )
    guarded.cookies = response.cookies
    return guarded
