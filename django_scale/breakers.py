"""Circuit breakers: per name, skip what just failed for a while, log each outage once, count it.

A :class:`Breakers` holds the breakers of one feature, one per *name* (``"cache 'default'"``,
``"the Celery broker"``). :meth:`Breakers.trip` opens a name's breaker for *retry_after*
seconds and counts the failure through :mod:`django_scale.metrics`; while it is open,
:meth:`Breakers.is_open` says so without any I/O, so callers skip the service and degrade.

An *outage* starts with the first trip of a closed breaker (logged once, as a warning) and ends
either when the breaker's time is up (``close_on_expiry=True``: the next caller tries the
service again, logged at info) or when the caller reports a success with
:meth:`Breakers.close` (``close_on_expiry=False``: a breaker that only a success may close,
such as one guarding a background thread's exchanges, which waits :meth:`Breakers.open_until`).
"""

from __future__ import annotations

import logging
import threading
import time

from django.core.exceptions import ImproperlyConfigured

from django_scale import metrics

__all__ = ["Breakers", "is_configuration_error"]


class Breakers:
    """Per-name circuit breakers of one feature, shared by the threads of a process."""

    def __init__(self, logger: logging.Logger, *, close_on_expiry: bool = True) -> None:
        #: Where outages are logged.
        self.logger = logger
        #: Whether an outage ends when the breaker's time is up (else only :meth:`close` ends it).
        self.close_on_expiry = close_on_expiry
        self._lock = threading.Lock()
        # Until when (time.monotonic()) each open breaker skips its service.
        self._open_until: dict[str, float] = {}
        # Names in an outage: tripped, and not closed since.
        self._outages: set[str] = set()

    def is_open(self, name: str) -> bool:
        """Return whether *name* is to be skipped now (no I/O, no lock on the closed path)."""
        until = self._open_until.get(name)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        if self.close_on_expiry:
            with self._lock:
                self._open_until.pop(name, None)
                self._outages.discard(name)
            self.logger.info("retrying %s after an outage", name)
        return False

    def open_until(self, name: str) -> float:
        """Return until when (``time.monotonic()``) *name* is skipped, or ``0.0`` if it is not."""
        return self._open_until.get(name, 0.0)

    def trip(
        self, name: str, error: BaseException | str, retry_after: float, *, metric: str | None = None
    ) -> bool:
        """Skip *name* for *retry_after* seconds after *error*; count it as *metric* if given.

        Return whether an outage starts (logged then, once, as a warning).
        """
        if metric is not None:
            metrics.increment(metric)
        with self._lock:
            starts = name not in self._outages
            self._outages.add(name)
            self._open_until[name] = time.monotonic() + retry_after
        if starts:
            verdict = "misconfigured" if is_configuration_error(error) else "unreachable"
            self.logger.warning("%s is %s (%s); not trying it for %.1f s", name, verdict, error, retry_after)
        return starts

    def close(self, name: str) -> bool:
        """Record that *name* answered: close its breaker; return whether an outage ended."""
        if name not in self._outages and name not in self._open_until:
            return False
        with self._lock:
            self._open_until.pop(name, None)
            ended = name in self._outages
            self._outages.discard(name)
        if ended:
            self.logger.info("%s answers again", name)
        return ended

    def reset(self) -> None:
        """Close every breaker without logging (a new process, or a test)."""
        with self._lock:
            self._open_until.clear()
            self._outages.clear()


def is_configuration_error(error: BaseException | str) -> bool:
    """Whether *error*, or an error it was raised from, is one of set-up, not of the network.

    A missing module (a broker transport's library, say) or Django's ``ImproperlyConfigured``
    does not heal by retrying: it is logged as "misconfigured", not "unreachable".
    """
    seen: set[int] = set()
    current: BaseException | None = error if isinstance(error, BaseException) else None
    while current is not None and id(current) not in seen:
        if isinstance(current, (ImportError, ImproperlyConfigured)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
