"""Storing entries off the request path: a miss hands its entry's ``SET`` to a thread.

A miss waits for the entry's ``MGET`` and the query; the ``SET`` of the new entry (pipelined
with the server's incarnation, when the miss learnt a new one) is sent by :data:`writer`'s
thread. Until it is sent, this process reads the entry from memory (:meth:`EntryWriter.unsent`),
so the next read of the key here is checked exactly as if Redis had answered it.

Correctness never depends on when, or whether, a ``SET`` lands: an entry carries the position
its rows were read at, and is checked against the current write positions, generation and
incarnation at every read. A ``SET`` that lands after a write stores an entry that write
already fails; one that never lands (the process exits, Redis fails, the queue is full) is a
later miss. The rows are pickled before the caller gets them, so a caller that changes its
model instances changes nothing stored.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable

from django_scale import metrics
from django_scale.cache.store import CacheDown

logger = logging.getLogger("django_scale.cache")

__all__ = ["EntryWriter", "writer"]

#: The most entries waiting to be sent; a miss past it stores nothing (the next one misses too).
MAX_UNSENT = 256


class EntryWriter:
    """A daemon thread per process that sends the entries of misses to Redis, in order."""

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        # Also in a forked child (gunicorn, Celery's prefork pool): the parent's thread, lock
        # and queue are not the child's.
        self._lock = threading.Condition(threading.Lock())
        self._jobs: deque[tuple[str, bytes, Callable[[], None], Callable[[CacheDown], None]]] = deque()
        self._unsent: dict[str, bytes] = {}
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(
        self, key: str, payload: bytes, send: Callable[[], None], failed: Callable[[CacheDown], None]
    ) -> None:
        """Have *send* store *payload* under *key* on the thread; *failed* is told of a failure."""
        with self._lock:
            if len(self._jobs) >= MAX_UNSENT:
                metrics.increment("querycache.store_dropped")
                return
            self._jobs.append((key, payload, send, failed))
            self._unsent[key] = payload
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="django-scale-querycache", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def unsent(self, key: str) -> bytes | None:
        """The payload of *key* waiting to be sent by this process, or ``None``."""
        return self._unsent.get(key) if self._unsent else None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every entry submitted so far is sent (or failed); return whether in time."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._jobs))
                key, payload, send, failed = self._jobs.popleft()
                self._busy = True
            try:
                send()
            except CacheDown as error:
                failed(error)
            except Exception:
                logger.exception("storing the query cache entry %s failed", key)
            finally:
                with self._lock:
                    if self._unsent.get(key) is payload:
                        del self._unsent[key]
                    self._busy = False
                    self._lock.notify_all()


#: This process's writer.
writer = EntryWriter()
os.register_at_fork(after_in_child=writer._forget)
