"""Storing entries off the request path: a miss leaves its entry's ``SET`` in an outbox.

A miss waits for the entry's ``MGET`` and the query, nothing more. Its entry's ``SET`` waits in
this process's outbox, and goes to Redis with the next ``MGET`` of the query cache in this
process (any thread), in the same pipeline: one round trip, no thread hand-off on the request
path. An entry no ``MGET`` takes within :data:`DELAY` is sent by :data:`writer`'s thread.
Until it is sent, this process reads the entry from memory (:meth:`EntryWriter.unsent`), so
the next read of the key here is checked exactly as if Redis had answered it.

Correctness never depends on when, or whether, a ``SET`` lands: an entry carries the position
its rows were read at, and is checked against the current write positions, generation and
incarnation at every read. A ``SET`` that lands after a write stores an entry that write
already fails; one that never lands (the process exits, Redis fails, the outbox is full) is a
later miss. The rows are pickled before the caller gets them, so a caller that changes its
model instances changes nothing stored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from django_scale import metrics
from django_scale.cache.store import CacheDown

logger = logging.getLogger("django_scale.cache")

__all__ = ["DELAY", "EntryWriter", "Outgoing", "writer"]

#: The most entries waiting to be sent; a miss past it stores nothing (the next one misses too).
MAX_UNSENT = 256
#: Seconds an entry waits for an ``MGET`` to carry it before the writer's thread sends it.
DELAY = 0.05


class Outgoing(NamedTuple):
    """An entry waiting to be sent."""

    #: The cache alias (``CACHE_ALIAS`` when the miss ran).
    alias: str
    key: str
    payload: bytes
    #: Seconds Redis keeps it.
    timeout: float
    #: Told when sending it failed (the cache is down).
    failed: Callable[[CacheDown], None]
    #: ``time.monotonic()`` when it was submitted.
    at: float


class EntryWriter:
    """The outbox of this process's entries, and the daemon thread that sends what waits."""

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        # Also in a forked child (gunicorn, Celery's prefork pool): the parent's thread, lock
        # and outbox are not the child's.
        self._lock = threading.Condition(threading.Lock())
        self._outbox: list[Outgoing] = []
        self._unsent: dict[str, bytes] = {}
        self._sending = 0
        self._flushing = 0
        #: Whether the thread waits for an entry with no deadline (only then must a submit wake it).
        self._idle = False
        self._thread: threading.Thread | None = None

    def submit(
        self, alias: str, key: str, payload: bytes, timeout: float, failed: Callable[[CacheDown], None]
    ) -> None:
        """Queue *payload* under *key*, to be sent with the next ``MGET`` or after :data:`DELAY`."""
        with self._lock:
            if len(self._outbox) >= MAX_UNSENT:
                metrics.increment("querycache.store_dropped")
                return
            self._outbox.append(Outgoing(alias, key, payload, timeout, failed, time.monotonic()))
            self._unsent[key] = payload
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="django-scale-querycache", daemon=True)
                self._thread.start()
            elif self._idle:
                # Only an idle thread needs waking: one waiting for an earlier entry's deadline
                # wakes before this one's (later) deadline, and looks again. Waking it on every
                # miss cost each miss a thread switch (the GIL handed over and back).
                self._lock.notify_all()

    def take(self, alias: str) -> list[Outgoing]:
        """Take the entries of *alias* waiting to be sent; the caller sends them, then calls :meth:`sent`."""
        if not self._outbox:
            return []
        with self._lock:
            taken = [item for item in self._outbox if item.alias == alias]
            if taken:
                self._outbox = [item for item in self._outbox if item.alias != alias]
                self._sending += 1
            return taken

    def sent(self, items: Sequence[Outgoing]) -> None:
        """*items* (from :meth:`take`) were sent, or failed: they are no longer read from memory."""
        if not items:
            return
        with self._lock:
            for item in items:
                if self._unsent.get(item.key) is item.payload:
                    del self._unsent[item.key]
            self._sending -= 1
            if self._flushing:
                self._lock.notify_all()  # only flush() waits for this

    def unsent(self, key: str) -> bytes | None:
        """The payload of *key* waiting to be sent by this process, or ``None``."""
        return self._unsent.get(key) if self._unsent else None

    def flush(self, timeout: float = 10.0) -> bool:
        """Send every entry submitted so far now; return whether they were sent (or failed) in time."""
        with self._lock:
            self._flushing += 1
            self._lock.notify_all()
            try:
                return self._lock.wait_for(lambda: not self._outbox and not self._sending, timeout)
            finally:
                self._flushing -= 1

    def _run(self) -> None:
        from django_scale.cache.queries.shared import SharedPositions
        from django_scale.cache.store import RedisStore, store_for

        while True:
            with self._lock:
                while True:
                    if self._outbox:
                        wait = DELAY - (time.monotonic() - self._outbox[0].at)
                        if wait <= 0 or self._flushing:
                            break
                        self._lock.wait(wait)
                    else:
                        self._idle = True
                        try:
                            self._lock.wait()
                        finally:
                            self._idle = False
                alias = self._outbox[0].alias
            items = self.take(alias)
            if not items:
                continue  # an MGET took them meanwhile
            try:
                store = store_for(alias)
                if isinstance(store, RedisStore):
                    SharedPositions(store).send(items)
            except CacheDown as error:
                items[0].failed(error)
            except Exception:
                logger.exception("storing query cache entries failed")
            finally:
                self.sent(items)


#: This process's writer.
writer = EntryWriter()
os.register_at_fork(after_in_child=writer._forget)
