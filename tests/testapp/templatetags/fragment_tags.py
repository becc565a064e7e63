"""A tag that reads the visitor's session through ``context.request``, as third-party tags do."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.simple_tag(takes_context=True)
def cart(context: Any) -> str:
    return str(context.request.session.get("cart", ""))
