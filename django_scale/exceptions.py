"""Exceptions raised by django-scale."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.db.utils import OperationalError

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "BulkDataError",
    "BulkError",
    "CacheArgumentError",
    "CacheKeyError",
    "ConfigurationError",
    "DjangoScaleError",
    "DjangoScaleWarning",
    "FragmentKeyError",
    "MetricsDocumentError",
    "NPlusOneError",
    "NPlusOneWarning",
    "PageRefillError",
    "PerUserFragmentError",
    "PrefetchBypassedWarning",
    "ReplicaReadError",
    "SniperError",
    "UnknownSettingError",
    "UnusedEagerLoadWarning",
    "UsageError",
]


class DjangoScaleError(Exception):
    """Base class of every exception django-scale raises."""


class ConfigurationError(DjangoScaleError, ImproperlyConfigured):
    """The ``DJANGO_SCALE`` setting cannot be used as it is.

    It is also an :class:`~django.core.exceptions.ImproperlyConfigured`, so code that already
    handles Django's configuration errors handles ours.
    """


class ArgumentError(DjangoScaleError, ValueError):
    """An argument has a value django-scale cannot use; the message names it and the fix.

    It is also a :class:`ValueError`, what Python raises for such arguments.
    """


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument has a type django-scale cannot use; the message names it and the fix.

    It is an :class:`ArgumentError` (so a :class:`ValueError`) and also a :class:`TypeError`,
    what Python raises for an argument of the wrong type.
    """


class UsageError(DjangoScaleError, RuntimeError):
    """An object was used in a way it does not support, such as entering an open block again.

    It is also a :class:`RuntimeError`, what Python raises for such misuse.
    """


class UnknownSettingError(DjangoScaleError, KeyError):
    """``conf.get(name)`` was asked for a *name* that is not a ``DJANGO_SCALE`` setting.

    It is also a :class:`KeyError`.
    """

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; this one is a sentence.
        return str(self.args[0]) if self.args else ""


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


class ReplicaReadError(DjangoScaleError, OperationalError):
    """A read on a replica failed: its connection broke, or the standby cancelled it.

    Raised by :class:`~django_scale.replicas.ReplicaGuard` for a read outside a transaction
    whose replica connection broke (the replica is taken out of rotation) or that the hot
    standby cancelled for a recovery conflict (SQLSTATE ``40001``). ``alias`` names the
    replica; the driver's error is chained as ``__cause__``. Inside a request that has not
    written and uses a safe method, :class:`~django_scale.middleware.ScaleMiddleware` runs the
    request once more with every read on the primary, so the user never sees it.

    It is also a :class:`django.db.OperationalError`, so code that handles database errors
    handles it.
    """

    def __init__(self, message: str, *, alias: str) -> None:
        super().__init__(message)
        #: The alias of the replica the read failed on.
        self.alias = alias


class SniperError(DjangoScaleError):
    """The query sniper cannot run as asked (a rule is malformed, or the database is not PostgreSQL)."""


class MetricsDocumentError(DjangoScaleError, ValueError):
    """A metrics document (raw sketches as JSON from another host) is malformed or of another version."""


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


class CacheArgumentError(ArgumentError):
    """An argument of :func:`~django_scale.cache.stale_while_revalidate` (or its view and
    template forms) is out of range; the message names the argument and the fix."""


class CacheKeyError(DjangoScaleError, TypeError):
    """A call's arguments cannot be turned into a cache key that tells users apart.

    Raised for arguments such as an ``HttpRequest`` or an unsaved model instance; the message
    says what to pass instead.
    """


class FragmentKeyError(CacheKeyError):
    """A vary value of a ``{% swrcache %}`` fragment has no stable key.

    A queryset, an unsaved model instance or an arbitrary object would either share one
    fragment between different values or never hit. Raised at render time when ``DEBUG`` is
    on; otherwise the fragment is logged once and rendered uncached. The message names the
    fragment, the value and what to pass instead.
    """


class PerUserFragmentError(DjangoScaleError):
    """A ``{% swrcache %}`` fragment read something of one visitor that its key does not cover.

    The CSRF token, flash messages, the session, cookies and headers, or the user when the
    fragment does not vary on the user. Raised at render time when ``DEBUG`` is on; otherwise
    the render is served to its visitor only, never stored, and logged once.
    """


class PageRefillError(DjangoScaleError):
    """A refill of a page cached with :func:`~django_scale.cache.swr_cache_page` stored nothing.

    The page its GET rendered through the middleware may not be stored (it set a cookie,
    read the session, ...) or did not map to the key being refilled. The refill counts as
    failed: the stale page is served meanwhile and the refill is retried with backoff.
    """
