"""Where the slow-query log keeps its records: in this process, then merged in the cache.

Recording never does I/O: a slow statement updates this process's pending records. A daemon
thread (started by the first record of each process, so forked workers start their own)
merges them every :data:`FLUSH_INTERVAL` seconds into one cache entry shared by every worker
and host, under a short lock so that no worker's counts are lost. The cache holds exactly two
keys (the table and its lock) and the table at most ``SLOW_QUERY_TOP`` statements, the ones
with the most total time. When the cache is down or hangs, only that thread waits; the
pending records stay here (at most twice ``SLOW_QUERY_TOP``) until a flush succeeds.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from django.core.cache import caches

from django_scale.breakers import Breakers
from django_scale.conf import conf
from django_scale.slowlog.records import Entry

__all__ = ["FLUSH_INTERVAL", "LOCK_KEY", "TABLE_KEY", "add", "flush", "merged", "reset"]

logger = logging.getLogger("django_scale.slowlog")
breakers = Breakers(logger)

#: Seconds between two merges of a process's records into the cache.
FLUSH_INTERVAL = 5.0
#: The cache key of the merged table, and of the lock that serializes merges.
TABLE_KEY = "django_scale:slowlog:v1:table"
LOCK_KEY = "django_scale:slowlog:v1:lock"
#: How long the merged table lives in the cache after its last merge (a week).
TABLE_TIMEOUT = 7 * 24 * 3600

_lock = threading.Lock()
# Serializes merges with each other and with reset(): a merge in flight never writes back
# records a reset has just forgotten.
_flush_lock = threading.Lock()
_pending: dict[str, Entry] = {}
_flusher_pid = 0
_stop = threading.Event()


def _trim(table: dict[str, Entry], size: int) -> dict[str, Entry]:
    """Keep the *size* records with the most total time."""
    if len(table) <= size:
        return table
    kept = sorted(table.items(), key=lambda item: item[1].total_ms, reverse=True)[:size]
    return dict(kept)


def add(key: str, fingerprint: str, alias: str, ms: float, route: str, sql: str, params: Any) -> None:
    """Count one slow run in this process's pending records."""
    global _pending
    with _lock:
        entry = _pending.get(key)
        if entry is None:
            entry = _pending[key] = Entry(fingerprint, alias)
        entry.add(ms, route, sql, params)
        limit = 2 * conf.SLOW_QUERY_TOP
        if len(_pending) > limit:
            _pending = _trim(_pending, limit)
    if _flusher_pid != os.getpid():
        _start_flusher()


def _start_flusher() -> None:
    global _flusher_pid
    with _lock:
        if _flusher_pid == os.getpid():
            return
        _flusher_pid = os.getpid()
    thread = threading.Thread(target=_flush_forever, name="django-scale-slowlog", daemon=True)
    thread.start()
    # At exit the services may be gone already: no last merge attempt to log a failure of.
    atexit.register(_stop.set)


def _flush_forever() -> None:
    while not _stop.wait(FLUSH_INTERVAL):
        flush()


def _take() -> dict[str, Entry]:
    global _pending
    with _lock:
        taken, _pending = _pending, {}
    return taken


def _give_back(entries: dict[str, Entry]) -> None:
    with _lock:
        for key, entry in entries.items():
            if key in _pending:
                entry.merge(_pending[key])
            _pending[key] = entry


def _read(cache: Any) -> dict[str, Entry]:
    raw = cache.get(TABLE_KEY) or {}
    return {key: Entry.from_dict(value) for key, value in raw.items()}


def flush() -> bool:
    """Merge this process's pending records into the cache; return whether it did.

    It does not when the cache is unreachable or another process holds the merge lock: the
    records stay pending for the next flush.
    """
    with _flush_lock:
        return _flush()


def _flush() -> bool:
    name = f"cache {conf.CACHE_ALIAS!r} (slow-query log)"
    if breakers.is_open(name):
        return False
    pending = _take()
    if not pending:
        return True
    cache = caches[conf.CACHE_ALIAS]
    try:
        if not cache.add(LOCK_KEY, os.getpid(), timeout=10):
            _give_back(pending)
            return False
        try:
            table = _read(cache)
            for key, entry in pending.items():
                if key in table:
                    table[key].merge(entry)
                else:
                    table[key] = entry
            table = _trim(table, conf.SLOW_QUERY_TOP)
            cache.set(TABLE_KEY, {key: entry.to_dict() for key, entry in table.items()}, TABLE_TIMEOUT)
        finally:
            cache.delete(LOCK_KEY)
    except Exception as error:
        _give_back(pending)
        breakers.trip(name, error, conf.CACHE_RETRY_AFTER, metric="slowlog.cache_down")
        return False
    breakers.close(name)
    return True


def merged() -> dict[str, Entry]:
    """Return the cache's table with this process's pending records added (this process's
    alone when the cache is unreachable)."""
    name = f"cache {conf.CACHE_ALIAS!r} (slow-query log)"
    table: dict[str, Entry] = {}
    if not breakers.is_open(name):
        try:
            table = _read(caches[conf.CACHE_ALIAS])
        except Exception as error:
            breakers.trip(name, error, conf.CACHE_RETRY_AFTER, metric="slowlog.cache_down")
    with _lock:
        pending = [(key, Entry.from_dict(entry.to_dict())) for key, entry in _pending.items()]
    for key, entry in pending:
        if key in table:
            table[key].merge(entry)
        else:
            table[key] = entry
    return _trim(table, conf.SLOW_QUERY_TOP)


def reset(*, cache: bool = True) -> None:
    """Forget this process's records and, if *cache*, the shared table (for tests and benches)."""
    with _flush_lock, _lock:
        _pending.clear()
    breakers.reset()
    if cache:
        try:
            caches[conf.CACHE_ALIAS].delete_many([TABLE_KEY, LOCK_KEY])
        except Exception as error:
            logger.warning("could not clear the slow-query log in the cache: %s", error)
