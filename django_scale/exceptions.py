"""Exceptions raised by django-scale."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = ["CacheArgumentError", "CacheKeyError", "ConfigurationError", "DjangoScaleError"]


class DjangoScaleError(Exception):
    """Base class of every exception django-scale raises."""


class ConfigurationError(DjangoScaleError, ImproperlyConfigured):
    """The ``DJANGO_SCALE`` setting cannot be used as it is.

    It is also an :class:`~django.core.exceptions.ImproperlyConfigured`, so code that already
    handles Django's configuration errors handles ours.
    """


class CacheArgumentError(DjangoScaleError, ValueError):
    """An argument of :func:`~django_scale.cache.stale_while_revalidate` (or its view and
    template forms) is out of range; the message names the argument and the fix."""


class CacheKeyError(DjangoScaleError, TypeError):
    """A call's arguments cannot be turned into a cache key that tells users apart.

    Raised for arguments such as an ``HttpRequest`` or an unsaved model instance; the message
    says what to pass instead.
    """
