"""Exceptions raised by django-scale."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "ConfigurationError",
    "DjangoScaleError",
    "DjangoScaleWarning",
    "NPlusOneError",
    "NPlusOneWarning",
    "PrefetchBypassedWarning",
    "UnusedEagerLoadWarning",
]


class DjangoScaleError(Exception):
    """Base class of every exception django-scale raises."""


class ConfigurationError(DjangoScaleError, ImproperlyConfigured):
    """The ``DJANGO_SCALE`` setting cannot be used as it is.

    It is also an :class:`~django.core.exceptions.ImproperlyConfigured`, so code that already
    handles Django's configuration errors handles ours.
    """


class NPlusOneError(DjangoScaleError):
    """An N+1 query pattern or an unused eager load, found where detection raises.

    Raised inside :func:`django_scale.prefetch.detect_n_plus_one` with ``mode="raise"`` and
    :func:`django_scale.testing.forbid_n_plus_one`; the message names the model, the
    relation, the calling line and the fix.
    """


class DjangoScaleWarning(UserWarning):
    """Base class of every warning django-scale issues."""


class NPlusOneWarning(DjangoScaleWarning):
    """A relation was loaded row by row for the rows of one result set (``mode="warn"``)."""


class UnusedEagerLoadWarning(DjangoScaleWarning):
    """A ``select_related`` or ``prefetch_related`` whose rows no code read (``mode="warn"``)."""


class PrefetchBypassedWarning(DjangoScaleWarning):
    """A prefetched relation was filtered or reordered, so Django queried it again."""
