"""``{% swrcache %}``: cache a template fragment with stale-while-revalidate.

Usage, after ``{% load scale %}``::

    {% swrcache 300 86400 "sidebar" section.pk request.user.pk %}
        ... expensive fragment ...
    {% endswrcache %}

The first two arguments are ``fresh`` and ``stale`` in seconds (numbers or variables), the
third the fragment's name, the rest the values the fragment varies on: like Django's
``{% cache %}``, every value that changes the output must be listed, or users share a
fragment. A trailing ``using="alias"`` picks the cache. A stale fragment is served and the one
request that wins the claim re-renders it (a template context cannot be sent to Celery);
a missing fragment is rendered once while concurrent requests wait for it.
"""

from __future__ import annotations

from typing import Any

from django import template
from django.template.base import FilterExpression, NodeList, Parser, Token
from django.template.context import Context

from django_scale.cache import build_key, encode_key_parts, fragment_engine
from django_scale.exceptions import CacheArgumentError

__all__ = ["SWRCacheNode", "do_swrcache"]

register = template.Library()


def _key_value(value: Any) -> Any:
    """Return *value* as a key part: JSON-able values as they are, other objects by their text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    pk = getattr(value, "pk", None)
    if pk is not None and isinstance(pk, (str, int)):
        return {"\x00model": type(value).__name__, "pk": pk}
    return {"\x00str": str(value)}


class SWRCacheNode(template.Node):
    """The node of one ``{% swrcache %}`` block."""

    def __init__(
        self,
        nodelist: NodeList,
        fresh: FilterExpression,
        stale: FilterExpression,
        name: FilterExpression,
        vary_on: list[FilterExpression],
        using: FilterExpression | None,
    ) -> None:
        self.nodelist = nodelist
        self.fresh, self.stale, self.name = fresh, stale, name
        self.vary_on = vary_on
        self.using = using

    def _seconds(self, expression: FilterExpression, context: Context, what: str) -> float:
        value = expression.resolve(context)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise CacheArgumentError(
                f"{{% swrcache %}} {what} must be a number of seconds, not {value!r}."
            ) from None

    def render(self, context: Context) -> str:
        fresh = self._seconds(self.fresh, context, "fresh (first argument)")
        stale = self._seconds(self.stale, context, "stale (second argument)")
        using = self.using.resolve(context) if self.using is not None else None
        engine = fragment_engine(fresh, stale, using)
        parts = [str(self.name.resolve(context)), [_key_value(v.resolve(context)) for v in self.vary_on]]
        key = build_key(engine.path, 1, encode_key_parts(parts))
        return str(engine.fetch(key, lambda: self.nodelist.render(context), None).value)


@register.tag("swrcache")
def do_swrcache(parser: Parser, token: Token) -> SWRCacheNode:
    """Parse ``{% swrcache fresh stale name [vary_on ...] [using="alias"] %}...{% endswrcache %}``."""
    nodelist = parser.parse(("endswrcache",))
    parser.delete_first_token()
    bits = token.split_contents()
    using = None
    if len(bits) > 1 and bits[-1].startswith("using="):
        using = parser.compile_filter(bits.pop()[len("using=") :])
    if len(bits) < 4:
        raise template.TemplateSyntaxError(
            f"{bits[0]!r} takes at least three arguments: fresh and stale seconds and a fragment "
            'name, as in {% swrcache 300 86400 "sidebar" %}.'
        )
    return SWRCacheNode(
        nodelist,
        parser.compile_filter(bits[1]),
        parser.compile_filter(bits[2]),
        parser.compile_filter(bits[3]),
        [parser.compile_filter(bit) for bit in bits[4:]],
        using,
    )
