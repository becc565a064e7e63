"""What a process keeps to itself: the fallback while the cache is down, recent claims, refused pages."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from django_scale.breakers import Breakers
from django_scale.cache import invalidations
from django_scale.conf import conf

logger = logging.getLogger("django_scale.cache")

#: The process's circuit breakers of caches (``"cache 'alias'"``) and the Celery broker.
breakers = Breakers(logger)


def trip_cache(alias: str, error: BaseException | str) -> None:
    """Open cache *alias*'s breaker after *error* for ``CACHE_RETRY_AFTER``, its retries by probe."""
    breakers.trip(
        f"cache {alias!r}", error, conf.CACHE_RETRY_AFTER, metric="swr.cache_down", probe=cache_probe(alias)
    )


def cache_probe(alias: str) -> Callable[[], object]:
    """The probe of cache *alias* for its breaker: a ``PING`` (a read elsewhere) that raises
    while the cache is down. It runs in a background thread once the breaker's time is up, so
    no request waits again on a cache that hangs."""

    def probe() -> object:
        from django_scale.cache.store import store_for  # the store imports this module's users

        return store_for(alias).ping()

    return probe


#: How many keys the per-process fallback keeps while the cache is unreachable.
LOCAL_FALLBACK_SIZE = 1024


_local_lock = threading.Lock()
_local: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()
# Striped locks: one computation per key per process while the cache is down, without a
# lock object per key.
stripes = [threading.Lock() for _ in range(64)]


def local_get(alias: str, key: str, now: float) -> tuple[bool, Any]:
    entry = _local.get((alias, key))
    if entry is not None and now < entry[1]:
        return True, entry[0]
    return False, None


def local_put(alias: str, key: str, value: Any, until: float) -> None:
    with _local_lock:
        _local[(alias, key)] = (value, until)
        _local.move_to_end((alias, key))
        while len(_local) > LOCAL_FALLBACK_SIZE:
            _local.popitem(last=False)


def local_forget(alias: str, key: str | None = None) -> None:
    with _local_lock:
        if key is not None:
            _local.pop((alias, key), None)
        else:
            for entry in [entry for entry in _local if entry[0] == alias]:
                del _local[entry]


#: Seconds a process remembers that a key's refill is claimed, and does not try to claim it.
CLAIM_MEMORY = 1.0
recent_claims: dict[tuple[str, str], float] = {}


def remember_claim(alias: str, key: str, seconds: float) -> None:
    if len(recent_claims) >= LOCAL_FALLBACK_SIZE:
        recent_claims.clear()
    recent_claims[(alias, key)] = time.monotonic() + seconds


#: (view, reason) pairs already logged: a page that cannot be cached is reported once per view.
logged_pages: set[tuple[str, str]] = set()
#: Seconds at most a process renders a page live, without claiming its key, after a rendering
#: of it was refused for a reason that holds for every visitor (see ``pages.Reason``).
UNSTORABLE_MEMORY = 60.0
# Page keys refused for every visitor, and until when (time.monotonic()) to render them live.
unstorable: dict[str, float] = {}


def remember_unstorable(key: str, seconds: float) -> None:
    if len(unstorable) >= LOCAL_FALLBACK_SIZE:
        unstorable.clear()
    unstorable[key] = time.monotonic() + seconds


def is_unstorable(key: str) -> bool:
    until = unstorable.get(key)
    if until is None:
        return False
    if time.monotonic() < until:
        return True
    unstorable.pop(key, None)
    return False


def log_page_once(path: str, reason: str, level: int) -> None:
    """Log that the page of the view at *path* is not cached, once per view and reason."""
    if (path, reason) in logged_pages:
        return
    if len(logged_pages) >= LOCAL_FALLBACK_SIZE:
        logged_pages.clear()
    logged_pages.add((path, reason))
    logger.log(level, "not caching %s: %s (reported once per view)", path, reason)


def reset_state() -> None:
    """Close every circuit breaker and forget the per-process fallback, claims and pending
    invalidations, as a new process would start (for tests)."""
    breakers.reset()
    recent_claims.clear()
    with _local_lock:
        _local.clear()
    invalidations.reset()
    logged_pages.clear()
    unstorable.clear()
