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

A trip may name a *probe* (a call that raises while the service is down, such as a Redis
``PING``): once the breaker's time is up, the next caller starts the probe in a background
thread and goes on skipping the service, as do the callers after it; a success of the probe
closes the breaker, a failure keeps it open for another *retry_after*. So after the first caller that waited on a service that hangs (accepts
connections, never answers) until its socket timeout, no caller waits on it again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

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
        # Per name: the probe of its service, and the retry_after of its last trip.
        self._probes: dict[str, tuple[Callable[[], object], float]] = {}
        # Names whose probe runs now, with the process running it (a fork inherits no thread).
        self._probing: dict[str, int] = {}

    def is_open(self, name: str) -> bool:
        """Return whether *name* is to be skipped now (no I/O, no lock on the closed path)."""
        until = self._open_until.get(name)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        probe = self._probes.get(name)
        if probe is not None:
            self._start_probe(name, *probe)
            return True  # skipped until the probe finds it answering
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
        self,
        name: str,
        error: BaseException | str,
        retry_after: float,
        *,
        metric: str | None = None,
        probe: Callable[[], object] | None = None,
    ) -> bool:
        """Skip *name* for *retry_after* seconds after *error*; count it as *metric* if given.

        With a *probe*, the retry after that runs in a background thread, not in a caller.
        Return whether an outage starts (logged then, once, as a warning).
        """
        if metric is not None:
            metrics.increment(metric)
        with self._lock:
            starts = name not in self._outages
            self._outages.add(name)
            self._open_until[name] = time.monotonic() + retry_after
            if probe is not None:
                self._probes[name] = (probe, retry_after)
        if starts:
            verdict = "misconfigured" if is_configuration_error(error) else "unreachable"
            self.logger.warning("%s is %s (%s); not trying it for %.1f s", name, verdict, error, retry_after)
        return starts

    def _start_probe(self, name: str, probe: Callable[[], object], retry_after: float) -> None:
        with self._lock:
            if self._probing.get(name) == os.getpid():
                return
            self._probing[name] = os.getpid()
        thread = threading.Thread(
            target=self._probe,
            args=(name, probe, retry_after),
            name=f"django-scale probe of {name}",
            daemon=True,
        )
        thread.start()

    def _probe(self, name: str, probe: Callable[[], object], retry_after: float) -> None:
        try:
            probe()
        except Exception as error:
            with self._lock:
                if name in self._outages:
                    self._open_until[name] = time.monotonic() + retry_after
            self.logger.debug("%s still fails (%s); not trying it for %.1f s", name, error, retry_after)
        else:
            self.close(name)
        finally:
            with self._lock:
                self._probing.pop(name, None)

    def close(self, name: str) -> bool:
        """Record that *name* answered: close its breaker; return whether an outage ended."""
        if name not in self._outages and name not in self._open_until:
            return False
        with self._lock:
            self._open_until.pop(name, None)
            self._probes.pop(name, None)
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
            self._probes.clear()


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
