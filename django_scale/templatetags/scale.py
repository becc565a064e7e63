"""``{% swrcache %}``: cache a template fragment with stale-while-revalidate.

Usage, after ``{% load scale %}``::

    {% swrcache 300 86400 "sidebar" section.pk request.user %}
        ... expensive fragment ...
    {% endswrcache %}

The first two arguments are ``fresh`` and ``stale`` in seconds (numbers or variables), the
third the fragment's name, the rest the values the fragment varies on: like Django's
``{% cache %}``, every value that changes the output must be listed, or users share a
fragment. A trailing ``using="alias"`` picks the cache. A stale fragment is served and the one
request that wins the claim re-renders it (a template context cannot be sent to Celery);
a missing fragment is rendered once while concurrent requests wait for it.

What keeps one visitor's fragment from another (stable keys, per-visitor reads never
stored) is described in :mod:`django_scale.cache.fragments`, where the node lives.
"""

from __future__ import annotations

from django import template
from django.template.base import Parser, Token

from django_scale.cache.fragments import SWRCacheNode, reset_state
from django_scale.cache.keys import key_value

__all__ = ["SWRCacheNode", "do_swrcache", "key_value", "reset_state"]

register = template.Library()


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
        bits[4:],
    )
