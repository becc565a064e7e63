"""The refill publisher: a thread per process that sends claimed refills off the request path."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

from django.db import close_old_connections

logger = logging.getLogger("django_scale.cache")


class Publisher:
    """A daemon thread per process that sends claimed refills to Celery, off the request path.

    The caller that wins a claim hands the refill over and returns the stale value at once: a
    slow or dead broker (redis-py retries a refused connection for seconds) never delays a
    request. When the broker cannot take the task, the refill is computed on this thread:
    still one computation per stale window, and still outside the request. A refill queued
    when the process exits is lost; its claim expires after ``refill_timeout`` and the next
    stale read claims again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def submit(self, job: Callable[[], None]) -> None:
        """Run *job* on the publisher thread, starting it if needed (also after a fork)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._pid != os.getpid():
            with self._lock:
                if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                    self._queue = queue.SimpleQueue()
                    self._pid = os.getpid()
                    self._thread = threading.Thread(
                        target=self._run, args=(self._queue,), name="django-scale-refills", daemon=True
                    )
                    self._thread.start()
        self._queue.put(job)

    def _run(self, jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                job()
            except Exception:
                logger.exception("sending a refill failed")
            finally:
                # An inline refill may have opened database connections on this thread.
                close_old_connections()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the jobs submitted so far have run; return whether they did in time."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Run the queued jobs, then stop the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None


#: The process's refill publisher.
publisher = Publisher()


def wait_for_refills(timeout: float = 10.0) -> bool:
    """Wait until the refills this process claimed so far were sent (or computed, broker down).

    For tests and benchmarks; a request never needs to.
    """
    return publisher.flush(timeout)


# -- The engine: one policy, the protocol for one key -----------------------------------------
