"""Which of ``bench site``'s configurations of the same pages this process serves.

``settings.SITE_CONFIG`` comes from ``DJANGO_SCALE_EXAMPLE_CONFIG`` (see the settings module):

* ``stock``: what the newsroom is without django-scale: Django's managers (relations loaded
  lazily, row by row), ``ModelAdmin``, no router, no cache;
* ``tuned``: what a careful team writes with Django and the popular packages alone:
  ``select_related``/``prefetch_related`` by hand, ``cache_page`` and ``{% cache %}`` with a TTL,
  django-multidb-router;
* ``scale``: django-scale throughout. Unset, the project is this one.
"""

from __future__ import annotations

from typing import Literal

from django.conf import settings

__all__ = ["site_config"]

SiteConfig = Literal["stock", "tuned", "scale"]


def site_config() -> SiteConfig:
    """Return the configuration this process serves (read on every call)."""
    value = getattr(settings, "SITE_CONFIG", "") or "scale"
    if value == "stock":
        return "stock"
    if value == "tuned":
        return "tuned"
    return "scale"
