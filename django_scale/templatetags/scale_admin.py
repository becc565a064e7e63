"""``{% scale_date_hierarchy cl %}``: the admin's date hierarchy by probes, after ``{% load scale_admin %}``.

``ScaleModelAdmin`` puts it in the ``date_hierarchy`` block of the changelist template in
place of Django's ``{% date_hierarchy cl %}``; the context comes from
:func:`django_scale.admin.date_hierarchy.date_hierarchy`, the template is Django's
``admin/date_hierarchy.html`` (or a project's ``admin/<app>/<model>/date_hierarchy.html``).
"""

from __future__ import annotations

from typing import Any

from django import template
from django.template.context import Context

from django_scale.admin.date_hierarchy import date_hierarchy

register = template.Library()


@register.simple_tag(takes_context=True)
def scale_date_hierarchy(context: Context, cl: Any) -> str:
    """Render the date hierarchy of the changelist *cl*, as Django's tag does."""
    data = date_hierarchy(cl)
    if not data:
        return ""
    opts = cl.opts
    # The template names Django's InclusionAdminNode looks up (contrib/admin/templatetags/base.py).
    chosen = context.template.engine.select_template(  # type: ignore[union-attr]
        [
            f"admin/{opts.app_label}/{opts.model_name}/date_hierarchy.html",
            f"admin/{opts.app_label}/date_hierarchy.html",
            "admin/date_hierarchy.html",
        ]
    )
    inner = context.new(data)
    csrf_token = context.get("csrf_token")
    if csrf_token is not None:
        inner["csrf_token"] = csrf_token
    return chosen.render(inner)
