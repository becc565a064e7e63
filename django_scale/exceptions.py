"""Exceptions raised by django-scale."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = ["BulkDataError", "BulkError", "ConfigurationError", "DjangoScaleError", "SniperError"]


class DjangoScaleError(Exception):
    """Base class of every exception django-scale raises."""


class ConfigurationError(DjangoScaleError, ImproperlyConfigured):
    """The ``DJANGO_SCALE`` setting cannot be used as it is.

    It is also an :class:`~django.core.exceptions.ImproperlyConfigured`, so code that already
    handles Django's configuration errors handles ours.
    """


class SniperError(DjangoScaleError):
    """The query sniper cannot run as asked (a rule is malformed, or the database is not PostgreSQL)."""


class BulkError(DjangoScaleError):
    """A bulk operation was called with arguments it cannot use."""


class BulkDataError(BulkError):
    """A row of a bulk load has data the database refused; nothing of its batch was written.

    ``row`` is the 1-based number of the offending row among all rows passed to the call,
    ``field`` the field's name when known.
    """

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        #: The 1-based number of the offending row among the rows passed in, when known.
        self.row = row
        #: The name of the offending field, when known.
        self.field = field
