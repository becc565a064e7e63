"""Exceptions raised by django-scale."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = ["ConfigurationError", "DjangoScaleError"]


class DjangoScaleError(Exception):
    """Base class of every exception django-scale raises."""


class ConfigurationError(DjangoScaleError, ImproperlyConfigured):
    """The ``DJANGO_SCALE`` setting cannot be used as it is.

    It is also an :class:`~django.core.exceptions.ImproperlyConfigured`, so code that already
    handles Django's configuration errors handles ours.
    """
