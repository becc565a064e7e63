"""Requests that ended but are not yet in the host's store: written in batches.

At a request's end :class:`~django_scale.metrics.MetricsMiddleware` only keeps what the request
leaves behind (its route's ``ResolverMatch``, method, ``X-Request-Start`` header, status,
latency, end time and figures) in this process's :class:`Pending` list. The list is written to
the store, as one write under one lock, when ``METRICS_BATCH`` requests are in it (by the
request that ends last), and otherwise by the process's timer thread, a second after the last
write. The process's first request writes at once and starts the timer. A request's series
names, buckets and the store's lock then cost a fraction of what they cost one request at a
time, and they run while their code is warm (see :doc:`/monitoring`, "Cost").

Every read of the store in this process writes its pending requests first (the store's
``before_read`` hook, which :func:`~django_scale.metrics.get_store` sets), as does a change of
``DJANGO_SCALE`` (to the store of the settings the requests ran under) and the process's exit
(``atexit``: a gunicorn worker recycled by ``max_requests`` or stopped exits through
``SystemExit``). A process killed outright (``SIGKILL``: the kernel's out-of-memory killer,
gunicorn's for a worker stuck past its timeout) loses the requests still waiting in its batch:
at most a second's, and fewer than a batch. A forked child starts with none of its parent's.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Pending"]

logger = logging.getLogger("django_scale.metrics")


class Pending:
    """This process's requests not yet written, and when to write them (see the module).

    :attr:`entries` is appended to by the request path without a lock (``list.append`` is
    atomic); :meth:`flush` takes the entries it found and deletes exactly those, under its own
    lock, so an entry appended meanwhile waits for the next write.
    """

    #: Seconds between two writes at most, while requests are pending.
    interval = 1.0

    def __init__(self, write: Callable[[list[Any]], None], size: int = 32) -> None:
        self._write = write
        #: Requests per write (``METRICS_BATCH``).
        self.size = size
        #: The requests not yet written, oldest first.
        self.entries: list[Any] = []
        #: How many pending requests make a request's end write them: :attr:`size`, or 0 until
        #: the process's first write (which starts its timer) and after a change of settings.
        self.limit = 0
        #: When (``time.perf_counter()``) the timer writes what is pending: a second after the last write.
        self.due = 0.0
        self._lock = threading.Lock()
        self._timer_pid = 0
        atexit.register(self._flush_at_exit)
        os.register_at_fork(after_in_child=self.forget_after_fork)

    def flush(self) -> int:
        """Write every pending request now; return how many. When it returns, every request
        that ended before it was called is in the store."""
        with self._lock:
            entries = self.entries
            taken = entries[:]
            del entries[: len(taken)]
            self.due = time.perf_counter() + self.interval
            self.limit = self.size
            if taken:
                if self._timer_pid != os.getpid():
                    self._start_timer()
                self._write(taken)
        return len(taken)

    def _start_timer(self) -> None:
        """Start this process's timer thread: it writes a batch a second old that no request wrote."""
        self._timer_pid = os.getpid()
        threading.Thread(target=self._timer, name="django-scale-metrics", daemon=True).start()

    def _timer(self) -> None:
        """Write, about a second after the last write, the requests that no request's end wrote.

        It runs as long as its process (a daemon thread; a forked child has none of its
        parent's threads and starts its own at its first write)."""
        while True:
            wait = self.due - time.perf_counter()
            if wait <= 0 and self.entries:
                self.write_due()
                continue
            # At least every second: a due time or an interval changed meanwhile is seen.
            time.sleep(min(wait, 1.0) if wait > 0 else 1.0)

    def write_due(self) -> None:
        """:meth:`flush`, as the request path, the timer and the exit write: a write that fails
        is logged (``django_scale.metrics``) and its requests dropped; it never fails a request."""
        try:
            self.flush()
        except Exception:
            logger.exception("django-scale could not write this process's pending request metrics")

    def _flush_at_exit(self) -> None:
        if self.entries:
            self.write_due()

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pending requests (the parent writes them), start afresh."""
        del self.entries[:]
        self._lock = threading.Lock()
        self._timer_pid = 0
        self.limit = 0
