"""Stale-while-revalidate caching: serve a value at once, refill it once, off the request path.

:func:`stale_while_revalidate` wraps a function (sync or async); :func:`swr_cache_page` wraps
a view; ``{% swrcache %}`` (in ``django_scale.templatetags.scale``) wraps a template fragment.
All three store an *envelope* ``(marker, value, created, fresh_until, stale_until)`` and:

* **fresh** (younger than ``fresh``): serve it. One cache read, nothing else.
* **stale** (younger than ``stale``): serve it, and claim the refill with an atomic ``SET NX``
  carrying a random token. Only the caller that wins the claim enqueues the Celery task
  ``django_scale.refresh`` with the key, the token and the key's generation; everyone else
  is counted as suppressed.
* **missing** (or older than ``stale``): a cold miss. One caller claims and computes; the
  others block on a per-key Redis list (``BLPOP``) until it is written or their ``wait``
  deadline passes, then compute themselves.

Writes are conditional on the key's *generation*: :meth:`SWRFunction.invalidate` increments
it, so a refill that started before the invalidation is discarded instead of overwriting
the newer state. On Redis (django-redis's default client) the claim, the conditional write,
the re-arm after a failure and the invalidation are Lua scripts, atomic across processes.
Other cache backends get the same logic through the Django cache API, which is atomic only
where ``cache.add()`` is, and waiters poll with a bounded backoff instead of blocking.

Failures degrade instead of failing: an unreachable cache opens a per-process circuit
breaker for ``CACHE_RETRY_AFTER`` seconds, during which the function is called and its
result kept in a small per-process map (one computation per process per key per ``fresh``);
an unreachable broker makes the claim holder refill inline (or, by option, serve stale); a
refill that raises re-arms the claim with exponential backoff and stale keeps being served;
a value that cannot be unpickled (a class renamed by a deploy) is a miss; an invalidation the
cache cannot take is journaled on the primary and replayed before any process reads the cache
again (:mod:`django_scale.invalidations`).
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import queue
import random
import secrets
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, ParamSpec, Protocol, TypeVar, cast, overload

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.core.cache import BaseCache, caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.db import close_old_connections, models, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils import translation
from django.utils.cache import patch_cache_control, patch_vary_headers

from django_scale import invalidations, metrics
from django_scale.conf import conf
from django_scale.exceptions import CacheArgumentError, CacheKeyError, PageRefillError
from django_scale.replicas import current_state, forced_route, use_primary

if TYPE_CHECKING:
    from redis import Redis
    from redis.commands.core import Script

__all__ = ["SWRFunction", "stale_while_revalidate", "swr_cache_page", "wait_for_refills"]

logger = logging.getLogger("django_scale.cache")

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")

#: First item of every envelope; a cached value without it is not ours and counts as a miss.
MARKER = "django_scale.swr.1"

RefillMode = Literal["celery", "inline"]
BrokerFallback = Literal["recompute", "serve_stale"]

#: How many keys the per-process fallback keeps while the cache is unreachable.
LOCAL_FALLBACK_SIZE = 1024
#: First and longest wait, in seconds, before a failed refill is tried again.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0


# -- Keys ----------------------------------------------------------------------------------


def _encode_argument(value: Any) -> Any:
    """Turn an argument JSON cannot encode into an unambiguous JSON value, or refuse it."""
    if isinstance(value, models.Model):
        if value.pk is None:
            raise CacheKeyError(
                f"Cannot build a cache key from an unsaved {type(value).__name__}: it has no primary "
                "key. Save it first or pass the values the function needs."
            )
        return {"\x00model": value._meta.label_lower, "pk": value.pk}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return {"\x00" + type(value).__name__: value.isoformat()}
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return {"\x00" + type(value).__name__: str(value)}
    if isinstance(value, (set, frozenset)):
        return {
            "\x00set": sorted(json.dumps(item, default=_encode_argument, sort_keys=True) for item in value)
        }
    if isinstance(value, bytes):
        return {"\x00bytes": value.hex()}
    if isinstance(value, HttpRequest):
        raise CacheKeyError(
            "Cannot build a cache key from an HttpRequest: it would either share one entry "
            "between users or never hit. Pass what the function needs from it (request.user.pk, "
            "a query parameter) as arguments, or cache the view with swr_cache_page(vary_on=...)."
        )
    raise CacheKeyError(
        f"Cannot build a cache key from an argument of type {type(value).__name__}: pass str, "
        "int, float, bool, None, lists, dicts, dates, Decimals, UUIDs or saved model instances, "
        "or give stale_while_revalidate a key= function that returns a str."
    )


def encode_key_parts(parts: object) -> str:
    """Return the stable, unambiguous text of *parts* (JSON, dict keys sorted, types tagged)."""
    return json.dumps(parts, default=_encode_argument, sort_keys=True, separators=(",", ":"))


def build_key(path: str, version: object, text: str) -> str:
    """Return the cache key of one entry: the function's path, its version and an argument digest.

    The part in braces is a Redis Cluster hash tag, so an entry and its claim, generation and
    notify keys live in one slot (the Lua scripts need that).
    """
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return f"swr:{{{path}:{version}:{digest}}}"


# -- Stores: the cache operations, on Redis (atomic, blocking waits) or any Django cache --------


class CacheDown(Exception):
    """The cache could not be reached (internal: opens the circuit breaker)."""


class Envelope(NamedTuple):
    marker: str
    value: Any
    created: float
    fresh_until: float
    stale_until: float


_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] == '1' then redis.call('DEL', KEYS[3]) end
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
return -1
"""
_WRITE = """
local written = 0
if tonumber(redis.call('GET', KEYS[2]) or '0') == tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('DEL', KEYS[5])
  written = 1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
redis.call('RPUSH', KEYS[4], '1')
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return written
"""
_FAIL = """
local failures = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local backoff = math.floor(math.min(tonumber(ARGV[2]) * 2 ^ (failures - 1), tonumber(ARGV[3])))
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if backoff > 0 then redis.call('PEXPIRE', KEYS[1], backoff) else redis.call('DEL', KEYS[1]) end
end
redis.call('RPUSH', KEYS[3], '1')
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return failures
"""
_INVALIDATE = """
local generation = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
return generation
"""


def _sub(key: str, name: str) -> str:
    return f"{key}:{name}"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Store:
    """Cache operations of the SWR protocol on any Django cache (the portable fallback).

    Not atomic beyond what ``cache.add()`` guarantees (LocMem and Memcached: atomic; the
    database cache: per row); waiters poll with a backoff from 5 ms to 50 ms.
    """

    def __init__(self, cache: BaseCache) -> None:
        self.cache = cache
        #: Whether the cache lives and dies with the process: its invalidations are not journaled.
        self.process_local = isinstance(cache, (LocMemCache, DummyCache))

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (CacheKeyError, CacheArgumentError):
            raise
        except Exception as error:
            raise CacheDown(str(error)) from error

    def get(self, key: str) -> Envelope | None:
        try:
            value = self.cache.get(key)
        except (AttributeError, EOFError, ImportError, IndexError, TypeError, ValueError) as error:
            # Unpickling a value whose class moved or changed (a deploy) fails in get().
            _log_undecodable(key, error)
            return None
        except Exception as error:
            raise CacheDown(str(error)) from error
        return _as_envelope(value)

    def claim(self, key: str, token: str, timeout: float, cold: bool) -> int | None:
        def claim() -> int | None:
            if not self.cache.add(_sub(key, "claim"), token, timeout):
                return None
            return int(self.cache.get(_sub(key, "gen"), 0))

        return self._call(claim)

    def generation(self, key: str) -> int:
        return self._call(lambda: int(self.cache.get(_sub(key, "gen"), 0)))

    def write(self, key: str, envelope: Envelope, timeout: float, generation: int, token: str) -> bool:
        def write() -> bool:
            written = int(self.cache.get(_sub(key, "gen"), 0)) == generation
            if written:
                self.cache.set(key, tuple(envelope), timeout)
                self.cache.delete(_sub(key, "fails"))
            if token and self.cache.get(_sub(key, "claim")) == token:
                self.cache.delete(_sub(key, "claim"))
            return written

        return self._call(write)

    def fail(self, key: str, token: str, backoff_first: float, keep_for: float) -> float:
        def fail() -> float:
            failures = int(self.cache.get(_sub(key, "fails"), 0)) + 1
            self.cache.set(_sub(key, "fails"), failures, keep_for)
            backoff = min(backoff_first * 2 ** (failures - 1), BACKOFF_MAX)
            if self.cache.get(_sub(key, "claim")) == token:
                if backoff > 0:
                    self.cache.touch(_sub(key, "claim"), backoff)
                else:
                    self.cache.delete(_sub(key, "claim"))
            return float(backoff)

        return self._call(fail)

    def release(self, key: str, token: str) -> None:
        def release() -> None:
            if self.cache.get(_sub(key, "claim")) == token:
                self.cache.delete(_sub(key, "claim"))

        self._call(release)

    def invalidate(self, key: str, keep_for: float) -> None:
        def invalidate() -> None:
            generation = int(self.cache.get(_sub(key, "gen"), 0)) + 1
            self.cache.set(_sub(key, "gen"), generation, keep_for)
            self.cache.delete_many([key, _sub(key, "claim"), _sub(key, "fails")])

        self._call(invalidate)

    def invalidate_group(self, group: str, keep_for: float) -> None:
        """Invalidate every key of *group* (``swr:{path:version``; ``""``: every SWR key).

        The Django cache API cannot list keys, so this clears the whole cache.
        """
        logger.warning(
            "invalidating every key of %s, which the cache cannot list: clearing the whole cache",
            group or "every function",
        )
        self._call(self.cache.clear)

    def wait(self, key: str, timeout: float) -> bool:
        """Return when *key* has a value, its claim is gone, or *timeout* seconds passed.

        Return whether the wait ended before the timeout.
        """
        deadline = time.monotonic() + timeout
        delay = 0.005
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
            if self.get(key) is not None or self._call(lambda: self.cache.get(_sub(key, "claim"))) is None:
                return True
        return False

    def pass_on(self, key: str) -> None:
        """Wake the next waiter of *key* (polling waiters need no wake-up)."""


class RedisStore(Store):
    """The SWR protocol on django-redis's default client: Lua scripts and ``BLPOP`` waits."""

    def __init__(self, cache: BaseCache) -> None:
        super().__init__(cache)
        self.client: Any = cache.client  # type: ignore[attr-defined]
        self._scripts: dict[tuple[int, str], Script] = {}

    def _redis(self, write: bool = True) -> Redis:
        return cast("Redis", self.client.get_client(write=write))

    def _script(self, redis: Redis, source: str) -> Script:
        script = self._scripts.get((id(redis), source))
        if script is None:
            script = self._scripts[(id(redis), source)] = redis.register_script(source)
        return script

    def _run(self, source: str, keys: Sequence[str], args: Sequence[bytes | str | int | float]) -> Any:
        script = self._script(self._redis(), source)
        return self._call(lambda: script(keys=[self.client.make_key(k) for k in keys], args=args))

    def get(self, key: str) -> Envelope | None:
        try:
            raw = self._redis(write=False).get(self.client.make_key(key))
        except Exception as error:
            raise CacheDown(str(error)) from error
        if raw is None:
            return None
        try:
            value = self.client.decode(raw)
        except Exception as error:
            # Any exception can come out of unpickling (a class renamed or changed by a
            # deploy, a corrupt value): the value is unusable, so it is a miss, never a 500.
            _log_undecodable(key, error)
            return None
        return _as_envelope(value)

    def claim(self, key: str, token: str, timeout: float, cold: bool) -> int | None:
        keys = (_sub(key, "claim"), _sub(key, "gen"), _sub(key, "notify"))
        generation = int(self._run(_CLAIM, keys, (token, _ms(timeout), "1" if cold else "0")))
        return None if generation < 0 else generation

    def generation(self, key: str) -> int:
        gen_key = self.client.make_key(_sub(key, "gen"))
        return int(self._call(lambda: self._redis().get(gen_key)) or 0)

    def write(self, key: str, envelope: Envelope, timeout: float, generation: int, token: str) -> bool:
        payload = self.client.encode(tuple(envelope))  # a tuple: always serialized
        keys = (key, _sub(key, "gen"), _sub(key, "claim"), _sub(key, "notify"), _sub(key, "fails"))
        args = (payload, _ms(timeout), generation, token, _ms(60))
        return bool(self._run(_WRITE, keys, args))

    def fail(self, key: str, token: str, backoff_first: float, keep_for: float) -> float:
        keys = (_sub(key, "claim"), _sub(key, "fails"), _sub(key, "notify"))
        args = (
            token,
            _ms(backoff_first) if backoff_first > 0 else 0,
            _ms(BACKOFF_MAX),
            _ms(keep_for),
            _ms(60),
        )
        failures = int(self._run(_FAIL, keys, args))
        return float(min(backoff_first * 2 ** (failures - 1), BACKOFF_MAX))

    def release(self, key: str, token: str) -> None:
        # A release is a failure without backoff: the claim goes, the waiters wake.
        self.fail(key, token, 0, 60)

    def invalidate(self, key: str, keep_for: float) -> None:
        keys = (key, _sub(key, "gen"), _sub(key, "claim"), _sub(key, "fails"))
        self._run(_INVALIDATE, keys, (_ms(keep_for),))

    def invalidate_group(self, group: str, keep_for: float) -> None:
        """Invalidate every key of *group* (``swr:{path:version``; ``""``: every SWR key).

        ``SCAN`` finds the group's entries and the claims and generations of entries that
        expired, so a refill still running cannot write one back; each is invalidated as
        :meth:`invalidate` would, a ``SCAN`` batch per pipeline.
        """
        probe = str(self.client.make_key("\x00"))
        if not probe.endswith("\x00"):
            super().invalidate_group(group, keep_for)  # a KEY_FUNCTION that hides the key
            return
        prefix = probe[:-1]
        pattern = _glob_escape(prefix + (group + ":" if group else "swr:{")) + "*"
        redis = self._redis()
        script = self._script(redis, _INVALIDATE)

        def invalidate_all() -> None:
            cursor = None
            while cursor != 0:
                cursor, found = redis.scan(cursor or 0, match=pattern, count=1000)
                entries = set()
                for raw in found:
                    name = raw.decode() if isinstance(raw, bytes) else str(raw)
                    if "}" in name:
                        entries.add(name[: name.rindex("}") + 1])
                pipeline = redis.pipeline(transaction=False)
                for entry in entries:
                    subs = [_sub(entry, "gen"), _sub(entry, "claim"), _sub(entry, "fails")]
                    script(keys=[entry, *subs], args=[_ms(keep_for)], client=pipeline)
                pipeline.execute()

        self._call(invalidate_all)

    def wait(self, key: str, timeout: float) -> bool:
        """Block on the key's notify list until a computing caller writes (or gives up), or *timeout*.

        Return whether a wake-up came. The caller passes it on with :meth:`pass_on` once it has
        found the value, so one write wakes every waiter in turn, and a wake-up left over from
        an earlier write cannot make a waiter spin.
        """
        redis = self._redis()
        notify = self.client.make_key(_sub(key, "notify"))
        # A BLPOP longer than the client's socket timeout would look like a dead server.
        socket_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0.001:
            step = min(remaining, socket_timeout * 0.8) if socket_timeout else remaining
            if self._call(functools.partial(redis.blpop, [notify], timeout=max(step, 0.01))) is not None:
                return True
        return False

    def pass_on(self, key: str) -> None:
        """Wake the next waiter of *key*."""
        notify = self.client.make_key(_sub(key, "notify"))

        def push() -> None:
            # BLPOP deleted the emptied list and its expiry with it: set one again.
            pipeline = self._redis().pipeline(transaction=False)
            pipeline.rpush(notify, b"1")
            pipeline.pexpire(notify, _ms(60))
            pipeline.execute()

        self._call(push)


def _glob_escape(text: str) -> str:
    """Escape the characters Redis glob patterns give a meaning to."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _as_envelope(value: Any) -> Envelope | None:
    if isinstance(value, tuple) and len(value) == 5 and value[0] == MARKER:
        return Envelope(*value)
    return None


def _log_undecodable(key: str, error: BaseException) -> None:
    metrics.increment("swr.undecodable")
    logger.warning("cached value of %s cannot be decoded (%r); treating it as a miss", key, error)


# Redis stores by alias, shared by all threads (django-redis clients are thread-safe), with
# the CACHES settings they were made from: override_settings(CACHES=...) makes a new dict.
_redis_stores: dict[str, tuple[object, Store]] = {}


def store_for(alias: str) -> Store:
    """Return the store for cache *alias*: :class:`RedisStore` on django-redis, else :class:`Store`.

    A Redis store is shared by the threads of a process, which saves the hot path Django's
    per-thread cache lookup; other backends get one store per thread's cache object.
    """
    current = caches.settings
    shared = _redis_stores.get(alias)
    if shared is not None and shared[0] is current:
        return shared[1]
    cache = caches[alias]
    store: Store | None = getattr(cache, "_django_scale_swr_store", None)
    if store is None:
        client = getattr(cache, "client", None)
        is_redis = type(cache).__module__.startswith("django_redis") and hasattr(client, "get_client")
        # Sharded and Herd clients spread keys over servers: the scripts need one server.
        if is_redis and type(client).__name__ in ("DefaultClient", "SentinelClient"):
            store = RedisStore(cache)
            _redis_stores[alias] = (current, store)
        else:
            store = Store(cache)
        cache._django_scale_swr_store = store  # type: ignore[attr-defined]
    return store


# -- Degradation: circuit breakers and the per-process fallback ----------------------------


class _Breaker:
    """Per-process circuit breakers of caches and the broker: skip what just failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_until: dict[str, float] = {}

    def is_open(self, name: str) -> bool:
        until = self._open_until.get(name)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        with self._lock:
            self._open_until.pop(name, None)
        logger.info("retrying %s after an outage", name)
        return False

    def trip(self, name: str, error: BaseException | str, retry_after: float) -> None:
        with self._lock:
            first = name not in self._open_until
            self._open_until[name] = time.monotonic() + retry_after
        if first:
            logger.warning("%s is unreachable (%s); not trying it for %.1f s", name, error, retry_after)

    def reset(self) -> None:
        with self._lock:
            self._open_until.clear()


breakers = _Breaker()

_local_lock = threading.Lock()
_local: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()
# Striped locks: one computation per key per process while the cache is down, without a
# lock object per key.
_stripes = [threading.Lock() for _ in range(64)]


def _local_get(alias: str, key: str, now: float) -> tuple[bool, Any]:
    entry = _local.get((alias, key))
    if entry is not None and now < entry[1]:
        return True, entry[0]
    return False, None


def _local_put(alias: str, key: str, value: Any, until: float) -> None:
    with _local_lock:
        _local[(alias, key)] = (value, until)
        _local.move_to_end((alias, key))
        while len(_local) > LOCAL_FALLBACK_SIZE:
            _local.popitem(last=False)


def _local_forget(alias: str, key: str | None = None) -> None:
    with _local_lock:
        if key is not None:
            _local.pop((alias, key), None)
        else:
            for entry in [entry for entry in _local if entry[0] == alias]:
                del _local[entry]


#: Seconds a process remembers that a key's refill is claimed, and does not try to claim it.
CLAIM_MEMORY = 1.0
_recent_claims: dict[tuple[str, str], float] = {}


def _remember_claim(alias: str, key: str, seconds: float) -> None:
    if len(_recent_claims) >= LOCAL_FALLBACK_SIZE:
        _recent_claims.clear()
    _recent_claims[(alias, key)] = time.monotonic() + seconds


def reset_state() -> None:
    """Close every circuit breaker and forget the per-process fallback, claims and pending
    invalidations, as a new process would start (for tests)."""
    breakers.reset()
    _recent_claims.clear()
    with _local_lock:
        _local.clear()
    invalidations.reset()
    _logged_pages.clear()
    _unstorable.clear()


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


class _Result(NamedTuple):
    value: Any
    #: Wall-clock time until which the value is fresh (for Cache-Control), 0 when unknown.
    fresh_until: float


class Deferred:
    """A computed value whose storing waits for a verdict its owner gives later.

    A computation returns ``Deferred(payload)`` instead of a value when whether the value may
    be stored is only known afterwards (:func:`swr_cache_page` judges the final response, once
    every middleware has run). The engine binds what storing it and giving it up mean where it
    was computed (a write under the claim, the token-less write of a caller that waited too
    long, the per-process fallback while the cache is down), and returns the ``Deferred`` as
    the result's value. Its owner then calls :meth:`commit` or :meth:`abandon`; only the first
    call counts. One never settled leaves its claim to expire after ``refill_timeout``.
    """

    __slots__ = ("_abandon", "_commit", "_lock", "payload")

    def __init__(self, payload: Any) -> None:
        #: What the computation hands its owner (the engine never looks at it).
        self.payload = payload
        self._commit: Callable[[Any], float] | None = None
        self._abandon: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def bind(self, commit: Callable[[Any], float], abandon: Callable[[], None]) -> Deferred:
        """Say how to store a value and how to give the computation up (engine side)."""
        self._commit, self._abandon = commit, abandon
        return self

    def _settle(self) -> tuple[Callable[[Any], float] | None, Callable[[], None] | None]:
        with self._lock:
            commit, abandon = self._commit, self._abandon
            self._commit = self._abandon = None
        return commit, abandon

    def commit(self, value: Any) -> float:
        """Store *value* as bound; return the wall-clock time until which it is fresh (0 if unknown)."""
        commit, _ = self._settle()
        return commit(value) if commit is not None else 0.0

    def abandon(self) -> None:
        """Store nothing and give the claim up, so the next caller computes at once."""
        _, abandon = self._settle()
        if abandon is not None:
            abandon()


class _Refill(NamedTuple):
    """What the Celery task needs to recompute a key: a registered path and JSON-able arguments."""

    path: str
    arguments: Any


class _LazyRefill:
    """The refill of a call, worked out only when a stale value needs one (off the hit path)."""

    __slots__ = ("args", "bound", "kwargs", "spec")

    def __init__(self, spec: Callable[..., _Refill | None], args: Any, kwargs: Any, bound: Any) -> None:
        self.spec, self.args, self.kwargs, self.bound = spec, args, kwargs, bound

    def resolve(self) -> _Refill | None:
        return self.spec(self.args, self.kwargs, self.bound)


def _resolve(refill: _Refill | _LazyRefill | None) -> _Refill | None:
    return refill.resolve() if isinstance(refill, _LazyRefill) else refill


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _nothing() -> None:
    """Give up nothing (a deferred value computed without a claim)."""


#: Decorated functions and views by path, for the Celery task to find them.
registry: dict[str, Engine] = {}


def _registered(engine: Engine) -> Engine:
    """Make *engine* findable by the refill task (a function defined in a function is not)."""
    if "<locals>" not in engine.path:
        registry[engine.path] = engine
    return engine


@dataclass(frozen=True)
class Engine:
    """The stale-while-revalidate protocol with one set of options (see :func:`stale_while_revalidate`)."""

    path: str
    fresh: float | None = None
    stale: float | None = None
    stale_if_error: float = 0.0
    cache: str | None = None
    refill: RefillMode = "celery"
    on_broker_error: BrokerFallback = "recompute"
    wait: float = 5.0
    jitter: float = 0.1
    refill_timeout: float = 60.0
    #: Turns the JSON-able arguments of a refill back into a computation (task side).
    rebuild: Callable[[Any], Callable[[], Any]] | None = None
    #: Returns the cache key the JSON-able arguments of a refill map to, with the code the
    #: read path builds keys with; the task writes only to that key (never to one a message
    #: names). An engine without it is never refilled by the task.
    key_of: Callable[[Any], str] | None = None

    # Options read at call time, so settings overrides apply.
    def alias(self) -> str:
        return self.cache if self.cache is not None else conf.CACHE_ALIAS

    def lifetimes(self) -> tuple[float, float]:
        fresh = self.fresh if self.fresh is not None else conf.SWR_FRESH
        stale = self.stale if self.stale is not None else conf.SWR_STALE
        return fresh, max(stale, fresh)

    def _keep_for(self, stale: float) -> float:
        """How long the generation counter must outlive an entry: longer than any refill."""
        return max(86400.0, stale + self.stale_if_error + 2 * self.refill_timeout)

    def envelope(self, value: Any, now: float) -> tuple[Envelope, float]:
        fresh, stale = self.lifetimes()
        # Jitter spreads the refills of keys written together (a deploy, a cold start).
        fresh_until = now + fresh * (1 - self.jitter * random.random())
        timeout = stale + self.stale_if_error
        return Envelope(MARKER, value, now, fresh_until, now + stale), timeout

    # -- the read path ----------------------------------------------------------------------

    def fetch(self, key: str, compute: Callable[[], Any], refill: _Refill | _LazyRefill | None) -> _Result:
        """Return the value of *key*: cached (fresh or stale) or computed by *compute*."""
        alias = self.alias()
        if breakers.is_open(f"cache {alias!r}"):
            return self._degraded(alias, key, compute)
        store = store_for(alias)
        try:
            if invalidations.due(alias):
                # A new process, or one that saw the cache fail, replays the journal now;
                # once per CHECK_INTERVAL, the publisher checks it off the request.
                invalidations.replay_due(alias, store, publisher.submit)
            envelope = store.get(key)
        except CacheDown as error:
            self._cache_down(alias, error)
            return self._degraded(alias, key, compute)
        now = time.time()
        if envelope is not None:
            if now < envelope.fresh_until:
                metrics.increment("swr.hit")
                return _Result(envelope.value, envelope.fresh_until)
            if now < envelope.stale_until:
                metrics.increment("swr.stale")
                metrics.observe("swr.staleness", now - envelope.fresh_until)
                deferred = self._revalidate(alias, store, key, compute, refill)
                # A deferred inline refill is the claim holder's own rendering: it gets that.
                return _Result(envelope.value if deferred is None else deferred, 0.0)
        return self._miss(alias, store, key, compute, envelope)

    def _revalidate(
        self,
        alias: str,
        store: Store,
        key: str,
        compute: Callable[[], Any],
        lazy_refill: _Refill | _LazyRefill | None,
    ) -> Deferred | None:
        # One claim attempt per process per stale window: the thread that marks the key first
        # asks Redis (where SET NX picks one winner across processes); the process's other
        # threads serve the stale value after their one GET.
        now = time.monotonic()
        seen = _recent_claims.get((alias, key))
        if seen is not None and now < seen:
            metrics.increment("swr.refill.suppressed")
            return None
        _remember_claim(alias, key, min(CLAIM_MEMORY, self.refill_timeout))
        token = secrets.token_hex(8)
        try:
            generation = store.claim(key, token, self.refill_timeout, cold=False)
        except CacheDown as error:
            self._cache_down(alias, error)
            return None
        if generation is None:
            metrics.increment("swr.refill.suppressed")
            return None
        refill = _resolve(lazy_refill) if self.refill == "celery" else None
        if refill is None:
            # Inline by option, or arguments Celery cannot carry: the claim holder refills now.
            metrics.increment("swr.refill.inline")
            outcome = self._refill(alias, key, token, generation, compute, primary=False, swallow=True)
            return outcome if isinstance(outcome, Deferred) else None
        # Decided here, in the request: did it write (so the refill must read the primary)?
        state = current_state()
        primary = forced_route() == "primary" or (state is not None and bool(state.wrote or state.pinned))
        job = functools.partial(self._send_refill, alias, key, token, generation, refill, primary)
        if transaction.get_connection(conf.PRIMARY).in_atomic_block:
            # The refill must read what this transaction writes: send it on commit.
            transaction.on_commit(functools.partial(publisher.submit, job), using=conf.PRIMARY)
            return None
        publisher.submit(job)
        return None

    def _send_refill(
        self, alias: str, key: str, token: str, generation: int, refill: _Refill, primary: bool
    ) -> None:
        """Enqueue the claimed refill (on the publisher thread); if the broker is down, refill here
        or back off, by option."""
        if not breakers.is_open("the Celery broker") and self._enqueue(
            refill, key, token, generation, alias, primary
        ):
            return
        if self.on_broker_error == "serve_stale" or self.rebuild is None:
            self._fail(alias, store_for(alias), key, token)
            return
        metrics.increment("swr.refill.inline")
        # Rebuilt from the JSON arguments, as the worker would: the caller's objects stay its own.
        compute = self.rebuild(refill.arguments)
        self.run_refill(alias, key, token, generation, compute, primary=primary, swallow=True)

    def _enqueue(
        self, refill: _Refill, key: str, token: str, generation: int, alias: str, primary: bool
    ) -> bool:
        """Send the refill to Celery; return whether it was sent."""
        from django_scale.tasks import refresh

        try:
            refresh.apply_async(
                args=(refill.path, alias, key, token, generation, refill.arguments, primary), retry=False
            )
        except Exception as error:
            metrics.increment("swr.broker_down")
            breakers.trip("the Celery broker", error, conf.CACHE_RETRY_AFTER)
            return False
        metrics.increment("swr.refill.enqueued")
        return True

    def run_refill(
        self,
        alias: str,
        key: str,
        token: str,
        generation: int,
        compute: Callable[[], Any],
        *,
        primary: bool,
        swallow: bool,
    ) -> bool:
        """Recompute *key* under the claim *token*; write it if *generation* still holds.

        A refill that raises re-arms the claim with exponential backoff (the stale value keeps
        being served meanwhile). Return whether the value was written (``False`` for a
        :class:`Deferred` one, written or not when its owner settles it).
        """
        return self._refill(alias, key, token, generation, compute, primary=primary, swallow=swallow) is True

    def _refill(
        self,
        alias: str,
        key: str,
        token: str,
        generation: int,
        compute: Callable[[], Any],
        *,
        primary: bool,
        swallow: bool,
    ) -> bool | Deferred:
        store = store_for(alias)
        started = time.monotonic()
        try:
            if primary:
                with use_primary():
                    value = compute()
            else:
                value = compute()
        except Exception:
            # Re-arm the claim before counting the failure: whoever sees the count (a test, a
            # status page) then sees the backoff too.
            self._fail(alias, store, key, token)
            metrics.increment("swr.refill.failed")
            logger.exception("refill of %s raised; serving the stale value and retrying later", key)
            if swallow:
                return False
            raise
        metrics.observe("swr.refill.seconds", time.monotonic() - started)
        if isinstance(value, Deferred):
            return value.bind(
                self._committer(alias, store, key, generation, token, refill=True),
                functools.partial(self._release, alias, store, key, token),
            )
        return self._write(alias, store, key, value, generation, token)

    def _committer(
        self, alias: str, store: Store, key: str, generation: int, token: str, *, refill: bool
    ) -> Callable[[Any], float]:
        """Return how a :class:`Deferred` value computed under *token* and *generation* is written."""

        def commit(value: Any) -> float:
            envelope, timeout = self.envelope(value, time.time())
            try:
                written = store.write(key, envelope, timeout, generation, token)
            except CacheDown as error:
                self._cache_down(alias, error)
                return envelope.fresh_until
            if refill:
                metrics.increment("swr.refill.succeeded" if written else "swr.refill.discarded")
                _recent_claims.pop((alias, key), None)
            return envelope.fresh_until

        return commit

    def _release(self, alias: str, store: Store, key: str, token: str) -> None:
        """Give the claim *token* up and wake the waiters (a deferred value that was not stored)."""
        _recent_claims.pop((alias, key), None)
        try:
            store.release(key, token)
        except CacheDown as error:
            self._cache_down(alias, error)

    def _write(self, alias: str, store: Store, key: str, value: Any, generation: int, token: str) -> bool:
        envelope, timeout = self.envelope(value, time.time())
        try:
            written = store.write(key, envelope, timeout, generation, token)
        except CacheDown as error:
            self._cache_down(alias, error)
            return False
        metrics.increment("swr.refill.succeeded" if written else "swr.refill.discarded")
        _recent_claims.pop((alias, key), None)
        return written

    def _fail(self, alias: str, store: Store, key: str, token: str) -> None:
        _, stale = self.lifetimes()
        try:
            store.fail(key, token, BACKOFF_FIRST, self._keep_for(stale))
        except CacheDown as error:
            self._cache_down(alias, error)

    def _miss(
        self, alias: str, store: Store, key: str, compute: Callable[[], Any], old: Envelope | None
    ) -> _Result:
        """Compute a missing value once: the claim holder computes, the others wait for it."""
        metrics.increment("swr.miss")
        deadline = time.monotonic() + self.wait
        try:
            while True:
                token = secrets.token_hex(8)
                generation = store.claim(key, token, self.refill_timeout, cold=True)
                if generation is not None:
                    return self._compute_and_write(alias, store, key, token, generation, compute, old)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                metrics.increment("swr.wait")
                woken = store.wait(key, remaining)
                envelope = store.get(key)
                if envelope is not None and time.time() < envelope.stale_until:
                    if woken:
                        store.pass_on(key)
                    return _Result(envelope.value, envelope.fresh_until)
                if time.monotonic() >= deadline:
                    break
            # The computing caller took longer than our deadline: compute ourselves.
            generation = store.generation(key)
        except CacheDown as error:
            self._cache_down(alias, error)
            return self._degraded(alias, key, compute)
        value = compute()
        if isinstance(value, Deferred):
            return _Result(
                value.bind(self._committer(alias, store, key, generation, "", refill=False), _nothing), 0.0
            )
        envelope, timeout = self.envelope(value, time.time())
        with contextlib.suppress(CacheDown):
            store.write(key, envelope, timeout, generation, "")
        return _Result(value, envelope.fresh_until)

    def _compute_and_write(
        self,
        alias: str,
        store: Store,
        key: str,
        token: str,
        generation: int,
        compute: Callable[[], Any],
        old: Envelope | None,
    ) -> _Result:
        try:
            value = compute()
        except Exception:
            with contextlib.suppress(CacheDown):
                store.release(key, token)
            if old is not None and time.time() < old.stale_until + self.stale_if_error:
                metrics.increment("swr.stale_if_error")
                logger.exception("recomputing %s raised; serving the value past stale (stale_if_error)", key)
                return _Result(old.value, 0.0)
            raise
        if isinstance(value, Deferred):
            commit = self._committer(alias, store, key, generation, token, refill=False)
            return _Result(
                value.bind(commit, functools.partial(self._release, alias, store, key, token)), 0.0
            )
        envelope, timeout = self.envelope(value, time.time())
        try:
            store.write(key, envelope, timeout, generation, token)
        except CacheDown as error:
            self._cache_down(alias, error)
        return _Result(value, envelope.fresh_until)

    # -- degradation ----------------------------------------------------------------------------

    def _cache_down(self, alias: str, error: BaseException) -> None:
        metrics.increment("swr.cache_down")
        _local_forget(alias)
        # Other processes may journal invalidations meanwhile: replay them once it answers.
        invalidations.mark_due(alias)
        breakers.trip(f"cache {alias!r}", error, conf.CACHE_RETRY_AFTER)

    def _degraded(self, alias: str, key: str, compute: Callable[[], Any]) -> _Result:
        """Serve without the cache: compute at most once per process per key per ``fresh``."""
        found, value = _local_get(alias, key, time.time())
        if found:
            return _Result(value, 0.0)
        with _stripes[hash(key) % len(_stripes)]:
            found, value = _local_get(alias, key, time.time())
            if found:
                return _Result(value, 0.0)
            metrics.increment("swr.miss")
            value = compute()
            if isinstance(value, Deferred):
                return _Result(value.bind(functools.partial(self._local_commit, alias, key), _nothing), 0.0)
            self._local_commit(alias, key, value)
            return _Result(value, 0.0)

    def _local_commit(self, alias: str, key: str, value: Any) -> float:
        """Keep *value* in the per-process fallback for ``fresh`` seconds."""
        fresh, _ = self.lifetimes()
        _local_put(alias, key, value, time.time() + fresh)
        return 0.0

    # -- writes from outside the read path ----------------------------------------------------

    def refresh(self, key: str, compute: Callable[[], Any]) -> Any:
        """Recompute *key* now and store it (unless it is invalidated meanwhile); return the value."""
        alias = self.alias()
        if breakers.is_open(f"cache {alias!r}"):
            return compute()
        store = store_for(alias)
        try:
            generation = store.generation(key)
        except CacheDown as error:
            self._cache_down(alias, error)
            return compute()
        value = compute()
        self._write(alias, store, key, value, generation, "")
        return value

    def invalidate(self, key: str) -> None:
        """Drop *key* and bump its generation, so no refill already running can write it back.

        When the cache is down, the invalidation is journaled on the primary (see
        :mod:`django_scale.invalidations`) and replayed by whichever process reads the cache
        first once it answers.
        """
        alias = self.alias()
        _local_forget(alias, key)
        _recent_claims.pop((alias, key), None)
        _, stale = self.lifetimes()
        keep_for = self._keep_for(stale)
        store = store_for(alias)
        if not breakers.is_open(f"cache {alias!r}"):
            try:
                store.invalidate(key, keep_for)
                return
            except CacheDown as error:
                self._cache_down(alias, error)
        where = invalidations.keep(alias, key, keep_for, process_local=store.process_local)
        logger.warning("cache %r is down; the invalidation of %s is kept in the %s", alias, key, where)


def _reject_refill(path: object, key: object, reason: str) -> bool:
    metrics.increment("swr.refill.rejected")
    logger.error("rejected a refill message for path %r, key %r: %s; nothing was written", path, key, reason)
    return False


def _importable_packages() -> list[str]:
    """Return the packages whose modules the refill task may import: installed apps' and the
    URLconf's."""
    from django.apps import apps
    from django.conf import settings

    packages = [config.name for config in apps.get_app_configs()]
    urlconf = getattr(settings, "ROOT_URLCONF", None)
    if isinstance(urlconf, str) and "." in urlconf:
        packages.append(urlconf.rpartition(".")[0])
    return packages


_urlconf_imported = False


def _engine_for(path: str) -> Engine | None:
    """Return the engine registered at *path*, importing only what may register it.

    A path is ``module.qualname``, so the module is one of its prefixes. Only the longest
    prefix that is an existing module inside the package of an installed app or of the
    ``ROOT_URLCONF`` is imported, and never a top-level module (an app's own package is
    imported by ``django.setup()``). Failing that, ``ROOT_URLCONF`` itself is imported once
    per process, which imports the views and what they use. Nothing else is ever imported.
    """
    global _urlconf_imported

    engine = registry.get(path)
    if engine is not None:
        return engine
    names = path.split(".")
    if len(names) < 2 or not all(name.isidentifier() for name in names):
        return None
    packages = _importable_packages()
    for end in range(len(names) - 1, 1, -1):
        module = ".".join(names[:end])
        if not any(module == package or module.startswith(package + ".") for package in packages):
            continue
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None  # a prefix that is a module, not a package: a shorter prefix is it
        if spec is None:
            continue
        try:
            importlib.import_module(module)
        except Exception:
            logger.exception("refill: importing %s, where %r should be registered, failed", module, path)
            return None
        return registry.get(path)
    if not _urlconf_imported:
        from django.conf import settings

        _urlconf_imported = True
        urlconf = getattr(settings, "ROOT_URLCONF", None)
        if isinstance(urlconf, str):
            try:
                importlib.import_module(urlconf)
            except Exception:
                logger.exception("refill: importing ROOT_URLCONF %r failed", urlconf)
        return registry.get(path)
    return None


def run_refill_task(
    path: Any, alias: Any, key: Any, token: Any, generation: Any, arguments: Any, primary: Any
) -> bool:
    """Run one refill for the Celery task ``django_scale.refresh``; return whether it wrote.

    Nothing in the message is trusted: the function is looked up in the registry (see
    :func:`_engine_for` for what may be imported to find it), the key is recomputed from the
    arguments with the engine's ``key_of`` and must equal the message's, and the cache must
    be the engine's own. A message that fails any of these is logged and dropped.
    """
    if not isinstance(path, str):
        return _reject_refill(path, key, "the path is not a string")
    engine = _engine_for(path)
    if engine is None or engine.rebuild is None:
        return _reject_refill(
            path, key, "no stale_while_revalidate function or swr_cache_page view is registered there"
        )
    if engine.key_of is None:
        return _reject_refill(path, key, "its engine cannot recompute keys from arguments (no key_of)")
    try:
        expected = engine.key_of(arguments)
    except Exception as error:
        return _reject_refill(path, key, f"its arguments do not make a key ({error})")
    if not isinstance(key, str) or key != expected:
        return _reject_refill(path, key, f"its arguments map to the key {expected!r}, not to this one")
    if alias != engine.alias():
        return _reject_refill(path, key, f"the cache {alias!r} is not the function's ({engine.alias()!r})")
    if not isinstance(token, str) or type(generation) is not int:
        return _reject_refill(path, key, "its claim token or generation is malformed")
    return engine.run_refill(
        alias, expected, token, generation, engine.rebuild(arguments), primary=bool(primary), swallow=False
    )


def _json_roundtrips(value: Any) -> bool:
    """Whether *value* survives JSON unchanged (tuples, sets, dates and models do not)."""
    try:
        return bool(json.loads(json.dumps(value)) == value)
    except (TypeError, ValueError):
        return False


# -- @stale_while_revalidate ---------------------------------------------------------------------


class SWRFunction(Protocol[P, R_co]):
    """A function wrapped by :func:`stale_while_revalidate`, with its cache controls.

    For an async function, calling it and :meth:`refresh` return awaitables.
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Return the cache key of these arguments (without the cache's ``KEY_PREFIX``)."""

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the entry of these arguments; a refill already running cannot write it back."""

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Recompute the entry of these arguments now, store and return it."""


#: Argument types whose keys are memoized: immutable, hashable, and compared with their type.
_PLAIN = frozenset({str, int, float, bool, type(None)})
#: How many keys a function memoizes before it starts over.
KEY_MEMO_SIZE = 4096


class _Binder:
    """Binds call arguments to a signature, so ``f(1)`` and ``f(a=1)`` are one key."""

    def __init__(self, func: Callable[..., Any], path: str, version: object, key: Callable[..., str] | None):
        self.signature = inspect.signature(func)
        self.path = path
        self.version = version
        self.custom_key = key
        self.memo: dict[tuple[tuple[type, Any], ...], str] = {}
        parameters = list(self.signature.parameters.values())
        self.names = tuple(p.name for p in parameters)
        # Plain positional parameters only: a full positional call binds without inspect.
        self.simple = all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters
        ) and not any(p.name.startswith("\x00") for p in parameters)

    def bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, inspect.BoundArguments | None]:
        if self.custom_key is not None:
            text = self.custom_key(*args, **kwargs)
            if not isinstance(text, str):
                raise CacheKeyError(
                    f"The key= function of {self.path} returned {type(text).__name__}, not str."
                )
            return build_key(self.path, self.version, text), None
        if self.simple and not kwargs and len(args) == len(self.names):
            # Memoized for plain values, by value and exact type (1, 1.0 and True differ).
            memo_key = tuple((type(arg), arg) for arg in args)
            if all(type(arg) in _PLAIN for arg in args):
                key = self.memo.get(memo_key)
                if key is None:
                    if len(self.memo) >= KEY_MEMO_SIZE:
                        self.memo.clear()
                    key = self.memo[memo_key] = build_key(
                        self.path, self.version, encode_key_parts(dict(zip(self.names, args, strict=True)))
                    )
                return key, None
            return build_key(
                self.path, self.version, encode_key_parts(dict(zip(self.names, args, strict=True)))
            ), None
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{self.path}(): {error}") from None
        bound.apply_defaults()
        return build_key(self.path, self.version, encode_key_parts(bound.arguments)), bound

    def key_of(self, arguments: Any) -> str:
        """Return the key of a refill's JSON arguments: :meth:`bind`'s, as on the read path.

        Raise :class:`~django_scale.exceptions.CacheKeyError` or ``TypeError`` for arguments
        that are not ``{"args": [...], "kwargs": {...}}`` or do not bind to the signature.
        """
        if (
            not isinstance(arguments, dict)
            or set(arguments) != {"args", "kwargs"}
            or not isinstance(arguments["args"], list)
            or not isinstance(arguments["kwargs"], dict)
            or not all(isinstance(name, str) for name in arguments["kwargs"])
        ):
            raise CacheKeyError(f"{self.path}: refill arguments are not {{'args': [...], 'kwargs': {{...}}}}")
        return self.bind(tuple(arguments["args"]), dict(arguments["kwargs"]))[0]

    def refill_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], bound: inspect.BoundArguments | None
    ) -> Any:
        """Return the JSON-able arguments a Celery refill calls the function with, or ``None``."""
        if bound is not None:
            args, kwargs = tuple(bound.args), dict(bound.kwargs)
        arguments = {"args": list(args), "kwargs": kwargs}
        if not _json_roundtrips(arguments):
            return None
        return arguments


def _validate(
    fresh: float | None,
    stale: float | None,
    stale_if_error: float,
    refill: str,
    on_broker_error: str,
    wait: float,
    jitter: float,
    refill_timeout: float,
) -> None:
    def number(name: str, value: object, *, allow_none: bool = False, allow_zero: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CacheArgumentError(f"{name}= must be a number of seconds, not {value!r}.")
        if value < 0 or (value == 0 and not allow_zero):
            raise CacheArgumentError(
                f"{name}= must be {'zero or more' if allow_zero else 'greater than zero'}, not {value!r}."
            )

    number("fresh", fresh, allow_none=True)
    number("stale", stale, allow_none=True)
    number("stale_if_error", stale_if_error, allow_zero=True)
    number("wait", wait, allow_zero=True)
    number("refill_timeout", refill_timeout)
    if fresh is not None and stale is not None and stale < fresh:
        raise CacheArgumentError(
            f"stale={stale!r} is less than fresh={fresh!r}: stale is the oldest age served at all, "
            f"so it must be at least fresh. Did you mean stale={fresh + stale!r}?"
        )
    if not 0 <= jitter < 1:
        raise CacheArgumentError(f"jitter= must be a fraction in [0, 1), not {jitter!r}.")
    if refill not in ("celery", "inline"):
        raise CacheArgumentError(f'refill= must be "celery" or "inline", not {refill!r}.')
    if on_broker_error not in ("recompute", "serve_stale"):
        raise CacheArgumentError(
            f'on_broker_error= must be "recompute" or "serve_stale", not {on_broker_error!r}.'
        )


@overload
def stale_while_revalidate(func: Callable[P, R], /) -> SWRFunction[P, R]: ...


@overload
def stale_while_revalidate(
    *,
    fresh: float | None = None,
    stale: float | None = None,
    stale_if_error: float = 0,
    cache: str | None = None,
    version: int | str = 1,
    key: Callable[..., str] | None = None,
    refill: RefillMode = "celery",
    on_broker_error: BrokerFallback = "recompute",
    wait: float = 5.0,
    jitter: float = 0.1,
    refill_timeout: float = 60.0,
) -> Callable[[Callable[P, R]], SWRFunction[P, R]]: ...


def stale_while_revalidate(
    func: Callable[P, R] | None = None,
    /,
    *,
    fresh: float | None = None,
    stale: float | None = None,
    stale_if_error: float = 0,
    cache: str | None = None,
    version: int | str = 1,
    key: Callable[..., str] | None = None,
    refill: RefillMode = "celery",
    on_broker_error: BrokerFallback = "recompute",
    wait: float = 5.0,
    jitter: float = 0.1,
    refill_timeout: float = 60.0,
) -> SWRFunction[P, R] | Callable[[Callable[P, R]], SWRFunction[P, R]]:
    """Cache a function's results: serve fresh values, serve stale ones while Celery refills them.

    :param fresh: seconds a value is served without a refill (default ``SWR_FRESH``).
    :param stale: the oldest age, in seconds, a value is served at all (default ``SWR_STALE``);
        between *fresh* and *stale* it is served while exactly one refill runs.
    :param stale_if_error: seconds past *stale* a value is still served when recomputing it
        raises (HTTP's ``stale-if-error``).
    :param cache: the cache alias (default ``CACHE_ALIAS``).
    :param version: part of every key; change it when the function's return value changes shape.
    :param key: a function of the same arguments returning a ``str`` to use instead of the
        arguments (the function's path and *version* are still part of the key).
    :param refill: ``"celery"`` (the task ``django_scale.refresh``) or ``"inline"`` (the caller
        that wins the claim recomputes before returning).
    :param on_broker_error: when the task cannot be sent, ``"recompute"`` inline (the claim
        holder only) or ``"serve_stale"`` and retry after a backoff.
    :param wait: seconds a caller waits on a cold miss for another caller's computation
        before computing itself.
    :param jitter: the fraction of *fresh* taken off at random, so keys written together do
        not go stale together.
    :param refill_timeout: seconds a claim lasts: longer than the function can take.
    """
    _validate(fresh, stale, stale_if_error, refill, on_broker_error, wait, jitter, refill_timeout)

    def decorate(function: Callable[P, R]) -> SWRFunction[P, R]:
        path = f"{function.__module__}.{function.__qualname__}"
        binder = _Binder(function, path, version, key)
        is_async = inspect.iscoroutinefunction(function)
        call: Callable[..., Any] = function

        def run_sync(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
            """Call the function from sync code (an async one on the caller's event loop)."""
            if is_async:
                # The coroutine is created here, only when a computation is needed.
                return async_to_sync(_await)(call(*args, **kwargs))
            return call(*args, **kwargs)

        def rebuild(arguments: Any) -> Callable[[], Any]:
            return functools.partial(run_sync, arguments["args"], arguments["kwargs"])

        engine = _registered(
            Engine(
                path=path,
                fresh=fresh,
                stale=stale,
                stale_if_error=stale_if_error,
                cache=cache,
                refill=refill,
                on_broker_error=on_broker_error,
                wait=wait,
                jitter=jitter,
                refill_timeout=refill_timeout,
                rebuild=rebuild,
                key_of=binder.key_of,
            )
        )

        def refill_spec(args: tuple[Any, ...], kwargs: dict[str, Any], bound: Any) -> _Refill | None:
            if "<locals>" in path or refill != "celery":
                return None  # the task could not find it: refill inline
            arguments = binder.refill_arguments(args, kwargs, bound)
            return None if arguments is None else _Refill(path, arguments)

        wrapper: Any
        if is_async:

            @functools.wraps(function)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, bound = binder.bind(args, kwargs)
                compute = functools.partial(run_sync, args, kwargs)
                fetch = sync_to_async(engine.fetch, thread_sensitive=False)
                result = await fetch(key_text, compute, _LazyRefill(refill_spec, args, kwargs, bound))
                return result.value

            async def arefresh(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, _ = binder.bind(args, kwargs)
                compute = functools.partial(run_sync, args, kwargs)
                return await sync_to_async(engine.refresh, thread_sensitive=False)(key_text, compute)

            wrapper = async_wrapper
            wrapper.refresh = arefresh
        else:

            @functools.wraps(function)
            def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, bound = binder.bind(args, kwargs)
                return engine.fetch(
                    key_text,
                    functools.partial(function, *args, **kwargs),
                    _LazyRefill(refill_spec, args, kwargs, bound),
                ).value

            def refresh(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, _ = binder.bind(args, kwargs)
                return engine.refresh(key_text, functools.partial(function, *args, **kwargs))

            wrapper = sync_wrapper
            wrapper.refresh = refresh

        def key_of(*args: P.args, **kwargs: P.kwargs) -> str:
            return binder.bind(args, kwargs)[0]

        def invalidate(*args: P.args, **kwargs: P.kwargs) -> None:
            engine.invalidate(binder.bind(args, kwargs)[0])

        wrapper.key = key_of
        wrapper.invalidate = invalidate
        wrapper._django_scale_engine = engine
        return cast("SWRFunction[P, R]", wrapper)

    if func is not None:
        return decorate(func)
    return decorate


# -- swr_cache_page -------------------------------------------------------------------------------
#
# The decorator renders the view and freezes the *view's* response (so on a hit every outer
# middleware runs again for that request), but whether the page may be stored is decided on
# the *final* response and request, after every middleware ran: ScaleMiddleware, the first
# entry of MIDDLEWARE, calls finish_page() with them. On a miss the decorator leaves a
# Deferred (the engine bound it to the claim) in the request's PageSlot; finish_page() judges
# and commits or abandons it. Refills render through the project's whole WSGI stack.

#: Response headers never stored with a cached page: they belong to one user or one response.
_PRIVATE_HEADERS = frozenset({"set-cookie", "date", "expires", "cache-control", "age"})
#: The WSGI environ key under which a refill hands its holder to the view it renders. It is not
#: an ``HTTP_*`` key, so no request header can forge it.
REFILL_ENVIRON_KEY = "django_scale.refill"
#: The request attribute ScaleMiddleware opens for the cached page of the request.
_SLOT_ATTRIBUTE = "_django_scale_page"
#: Request headers that carry a visitor's credentials: never put in a refill's request.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
#: Paths of the views cached with swr_cache_page (for the system checks).
page_paths: set[str] = set()
#: (view, reason) pairs already logged: a page that cannot be cached is reported once per view.
_logged_pages: set[tuple[str, str]] = set()
#: Seconds at most a process renders a page live, without claiming its key, after a rendering
#: of it was refused for a reason that holds for every visitor (see :class:`_Reason`).
UNSTORABLE_MEMORY = 60.0
# Page keys refused for every visitor, and until when (time.monotonic()) to render them live.
_unstorable: dict[str, float] = {}


class _Reason(NamedTuple):
    """Why a page may not be stored."""

    text: str
    #: Whether it holds for every visitor (the page uses the CSRF token, varies on an unlisted
    #: header, ...), not only for this one (their flash messages, their session being saved).
    every_visitor: bool = False


def _remember_unstorable(key: str, seconds: float) -> None:
    if len(_unstorable) >= LOCAL_FALLBACK_SIZE:
        _unstorable.clear()
    _unstorable[key] = time.monotonic() + seconds


def _is_unstorable(key: str) -> bool:
    until = _unstorable.get(key)
    if until is None:
        return False
    if time.monotonic() < until:
        return True
    _unstorable.pop(key, None)
    return False


class UncacheableResponse(Exception):
    """A response that must not be cached (internal: the view's own response is served)."""

    def __init__(self, response: HttpResponseBase, reason: str) -> None:
        super().__init__(reason)
        self.response = response


class _RefillHolder:
    """Carries a refill's result out of the WSGI request that rendered it."""

    __slots__ = ("key", "reason", "value")

    def __init__(self, key: str) -> None:
        #: The key being refilled: the rendered request must map to it.
        self.key = key
        self.value: Any = None
        self.reason: str | None = None


@dataclass
class _Page:
    """What the final pass needs to know about the cached page a request served or rendered."""

    view: _PageView
    key: str
    #: The view's response in storable form (``None`` for a page served from the cache).
    frozen: Any = None
    #: This request won the claim: store the page through it, or give it up.
    deferred: Deferred | None = None
    #: This request is a refill's: hand the page to the holder.
    holder: _RefillHolder | None = None
    #: Until when the served copy is fresh (a page served from the cache).
    fresh_until: float = 0.0


class PageSlot:
    """Room for the cached page of one request, opened by ScaleMiddleware as the request comes in.

    The view decorator puts a :class:`_Page` in it; ScaleMiddleware hands it to
    :func:`finish_page` with the final response.
    """

    __slots__ = ("entered", "page")

    def __init__(self) -> None:
        self.page: _Page | None = None
        #: A cached view already ran for this request: another one nested in it renders live.
        self.entered = False

    @property
    def needs_io(self) -> bool:
        """Whether finishing reads the session or writes the cache (not just sets headers)."""
        return self.page is not None and self.page.frozen is not None


def open_page_slot(request: HttpRequest) -> PageSlot | None:
    """Give *request* a page slot; return it, or ``None`` when an outer ScaleMiddleware gave one."""
    if isinstance(getattr(request, _SLOT_ATTRIBUTE, None), PageSlot):
        return None
    slot = PageSlot()
    setattr(request, _SLOT_ATTRIBUTE, slot)
    return slot


def finish_page(slot: PageSlot, request: HttpRequest, response: HttpResponseBase) -> None:
    """Judge the final *response* to *request*, store or give up the page, set its caching headers.

    ScaleMiddleware calls it once every other middleware has run. A page served from the cache
    only gets its headers; one this request rendered is stored (under the claim it won) only
    if :meth:`_PageView.verdict` finds nothing of the visitor's in the final response.
    """
    page, slot.page = slot.page, None
    if page is None:
        return
    view = page.view
    if page.frozen is None:
        if response.status_code in (200, 304) and not response.streaming:
            view.patch_headers(request, response, page.fresh_until)
        return
    reason = view.verdict(request, response, page.frozen)
    if page.holder is not None:
        if reason is None and page.key != page.holder.key:
            reason = _Reason(
                "its request did not reproduce the variant being refilled (it maps to another key)"
            )
        if reason is None:
            page.holder.value = page.frozen
        else:
            page.holder.reason = reason.text
        return
    if page.deferred is None:
        return
    if reason is not None:
        page.deferred.abandon()
        if reason.every_visitor:
            # Every visitor's rendering would be refused alike: render it live for a while
            # instead of claiming, so concurrent requests do not queue behind each other's
            # claims (each renders, is refused and hands the claim on to the next).
            _remember_unstorable(page.key, min(view.engine.lifetimes()[0], UNSTORABLE_MEMORY))
        _log_page(view.path, reason.text, logging.WARNING)
        return
    view.patch_headers(request, response, page.deferred.commit(page.frozen))


def abandon_page(slot: PageSlot) -> None:
    """Give up the page of a request whose middleware raised: nothing is stored, the claim goes."""
    page, slot.page = slot.page, None
    if page is None:
        return
    if page.deferred is not None:
        page.deferred.abandon()
    if page.holder is not None:
        page.holder.reason = "a middleware raised after the view"


def _log_page(path: str, reason: str, level: int) -> None:
    if (path, reason) in _logged_pages:
        return
    if len(_logged_pages) >= LOCAL_FALLBACK_SIZE:
        _logged_pages.clear()
    _logged_pages.add((path, reason))
    logger.log(level, "not caching %s: %s (reported once per view)", path, reason)


def _vary_names(headers: Any) -> set[str]:
    return {name.strip().lower() for name in headers.get("Vary", "").split(",") if name.strip()}


def _csrf_token_used(request: HttpRequest) -> bool:
    # get_token() (what {% csrf_token %} calls) flags the request for CsrfViewMiddleware to
    # send the cookie; the middleware resets the flag to False but leaves the key. Nothing
    # public says the token was used, and with CSRF_USE_SESSIONS a token read back from the
    # session sets no cookie. See django/middleware/csrf.py, get_token() and process_response()
    # (4.2 to 6.1); pinned by tests/test_isolation_pages.py.
    return "CSRF_COOKIE_NEEDS_UPDATE" in request.META


def _csp_nonce_used(request: HttpRequest) -> bool:
    """Whether the page used the Content-Security-Policy nonce of the request (Django 6.0+)."""
    try:
        from django.middleware.csp import get_nonce  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    # LazyNonce is true once generated (django/utils/csp.py), which build_policy() never does.
    return bool(get_nonce(request))


def _has_messages(request: HttpRequest) -> bool:
    """Whether the request has flash messages, read or not (``{% if messages %}`` reads no flag)."""
    from django.contrib.messages import get_messages

    return len(get_messages(request)) > 0


def _user_pk(request: HttpRequest) -> Any:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    return user.pk


def _freeze_response(response: HttpResponseBase) -> Any:
    """Return the storable form of the view's *response*, or raise :class:`UncacheableResponse`."""
    render = getattr(response, "render", None)
    if render is not None and not getattr(response, "is_rendered", True):
        render()
    if response.streaming or not isinstance(response, HttpResponse):
        raise UncacheableResponse(response, "it is streaming")
    if response.status_code != 200:
        raise UncacheableResponse(response, f"its status is {response.status_code}")
    headers = [(k, v) for k, v in response.items() if k.lower() not in _PRIVATE_HEADERS]
    return (response.status_code, headers, response.content)


def _thaw_response(frozen: Any) -> HttpResponse:
    status, headers, content = frozen
    response = HttpResponse(content, status=status)
    for name, value in headers:
        response[name] = value
    return response


class _PageView:
    """A view cached with :func:`swr_cache_page`: its key, its verdict and its headers."""

    def __init__(
        self,
        view: Callable[..., Any],
        path: str,
        version: int | str,
        vary_on: Sequence[str],
        shared: bool,
        stale_if_error: float,
    ) -> None:
        self.view = view
        self.path = path
        self.version = version
        self.is_async = inspect.iscoroutinefunction(view)
        self.headers = [name for name in vary_on if name != "user"]
        self.per_user = "user" in vary_on
        self.shared = shared
        self.stale_if_error = stale_if_error
        #: What the served response varies on (Cookie: the user comes from the session cookie).
        self.vary = [*self.headers, *(["Cookie"] if self.per_user else [])]
        #: Vary names the key covers whatever the response.
        self.covered = frozenset(name.lower() for name in self.vary)
        self.keyed_authorization = "authorization" in self.covered
        #: Credentials in the key: never sent through the broker, so refilled inline.
        self.credentials = bool(self.covered & _CREDENTIAL_HEADERS) or self.per_user
        self.engine: Engine

    # -- the key: one implementation, for requests and for refill messages --------------------

    def parts(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Return what the key of *request* is made of; also a refill's JSON-able arguments."""
        parts: dict[str, Any] = {
            "host": request.get_host(),
            "path": request.path,
            "path_info": request.path_info,
            "query": request.META.get("QUERY_STRING", ""),
            "secure": request.is_secure(),
            "args": list(args),
            "kwargs": kwargs,
            "headers": {name: request.headers.get(name) for name in self.headers},
        }
        if settings.USE_I18N:
            # The language LocaleMiddleware activated, from the URL, the cookie or the header.
            parts["language"] = translation.get_language()
        if self.per_user:
            parts["user"] = _user_pk(request)
        return parts

    def key_of(self, parts: Any) -> str:
        """Return the cache key of *parts* (a request's, or a refill message's arguments)."""
        return build_key(self.path, self.version, encode_key_parts(parts))

    def key(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """Return the cache key of *request* (the active language included)."""
        return self.key_of(self.parts(request, args, kwargs))

    # -- rendering ---------------------------------------------------------------------------------

    def call(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> HttpResponseBase:
        response = self.view(request, *args, **kwargs)
        if self.is_async:
            response = async_to_sync(_await)(response)
        return cast(HttpResponseBase, response)

    def render(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> Deferred:
        """Render the view for a caller that won the claim; the final pass stores it, or not."""
        response = self.call(request, args, kwargs)
        return Deferred((response, _freeze_response(response)))

    # -- the final test ------------------------------------------------------------------------------

    def verdict(self, request: HttpRequest, response: HttpResponseBase, frozen: Any) -> _Reason | None:
        """Return why the final *response* to *request* must not be stored, or ``None`` if it may be.

        Every middleware has run: the cookies it sets, its ``Vary``, the session and the
        messages it touched are all visible. One list of reasons, in docs/caching.md.
        """
        if response.streaming or response.status_code not in (200, 304):
            return _Reason(f"the final response's status is {response.status_code}")
        if _csrf_token_used(request):
            return _Reason("it used the CSRF token ({% csrf_token %} or get_token())", every_visitor=True)
        if response.cookies:
            return _Reason(f"the final response sets cookies ({', '.join(sorted(response.cookies))})")
        if _csp_nonce_used(request):
            return _Reason("it used the Content-Security-Policy nonce", every_visitor=True)
        control = response.get("Cache-Control", "").lower()
        if "private" in control or "no-store" in control:
            return _Reason("its Cache-Control is private or no-store", every_visitor=True)
        if "HTTP_AUTHORIZATION" in request.META and not self.keyed_authorization:
            return _Reason("the request carries an Authorization header (add it to vary_on)")
        if not self.shared:
            session = getattr(request, "session", None)
            # SessionBase.accessed is what SessionMiddleware adds "Vary: Cookie" from.
            if not self.per_user and session is not None and getattr(session, "accessed", False):
                return _Reason(
                    "it read the session, which includes request.user (vary_on 'user', or shared=True)",
                    every_visitor=True,
                )
            covered = set(self.covered)
            if settings.USE_I18N:
                covered.add("accept-language")  # the active language is part of the key
            stored_vary = {"Vary": ", ".join(value for name, value in frozen[1] if name.lower() == "vary")}
            if "accept-encoding" not in _vary_names(stored_vary):
                # The stored body is the view's: GZipMiddleware compresses each hit anew.
                covered.add("accept-encoding")
            uncovered = _vary_names(response) - covered
            if uncovered:
                return _Reason(
                    f"it varies on {', '.join(sorted(uncovered))}, which vary_on does not list",
                    every_visitor=True,
                )
        if _has_messages(request):
            return _Reason("the request has flash messages")
        return None

    def patch_headers(self, request: HttpRequest, response: HttpResponseBase, fresh_until: float) -> None:
        """Set the caching headers of a page that is (or could have been) stored."""
        control = response.get("Cache-Control", "").lower()
        if "no-store" in control:
            return
        fresh, stale = self.engine.lifetimes()
        max_age = max(0, int(fresh_until - time.time())) if fresh_until else 0
        options: dict[str, Any] = {"max_age": max_age, "stale_while_revalidate": int(stale - fresh)}
        if self.stale_if_error:
            options["stale_if_error"] = int(self.stale_if_error)
        # Never public with a Set-Cookie (a middleware may set one on a hit).
        if self.per_user or response.cookies or "private" in control:
            options["private"] = True
        else:
            options["public"] = True
        patch_cache_control(response, **options)
        vary = self.vary
        if settings.USE_I18N and settings.LANGUAGE_COOKIE_NAME in request.COOKIES:
            # The language may come from the cookie, which LocaleMiddleware's Vary does not say.
            vary = [*vary, "Cookie"]
        if vary:
            patch_vary_headers(response, vary)

    # -- the request path ------------------------------------------------------------------------------

    def respond(
        self, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> HttpResponseBase:
        if request.method not in ("GET", "HEAD"):
            return self.call(request, args, kwargs)
        slot = getattr(request, _SLOT_ATTRIBUTE, None)
        holder = request.META.get(REFILL_ENVIRON_KEY)
        if not isinstance(slot, PageSlot):
            reason = (
                "django_scale.middleware.ScaleMiddleware is not the first entry of MIDDLEWARE, so "
                "the final response cannot be judged; the page is served uncached"
            )
            if isinstance(holder, _RefillHolder):
                holder.reason = reason
            _log_page(self.path, reason, logging.WARNING)
            return self.call(request, args, kwargs)
        if slot.entered:
            return self.call(request, args, kwargs)  # a cached view called by another one
        slot.entered = True
        if isinstance(holder, _RefillHolder):
            return self.render_for_refill(slot, holder, request, args, kwargs)
        if "HTTP_AUTHORIZATION" in request.META and not self.keyed_authorization:
            # Credentials: never served a shared page, never stored as one.
            return self.call(request, args, kwargs)
        parts = self.parts(request, args, kwargs)
        if self.per_user and parts["user"] is None and settings.SESSION_COOKIE_NAME in request.COOKIES:
            # An anonymous session may hold the visitor's data: not the anonymous entry's.
            return self.call(request, args, kwargs)
        key = self.key_of(parts)
        if _unstorable and _is_unstorable(key):
            # Refused for every visitor moments ago: no claim, no cache, no caching headers.
            return self.call(request, args, kwargs)
        # Worked out only when a stale page needs a refill, never on a hit.
        spec = _LazyRefill(self.refill_spec, parts, None, None) if self.celery else None
        try:
            result = self.engine.fetch(key, functools.partial(self.render, request, args, kwargs), spec)
        except UncacheableResponse as uncacheable:
            logger.debug("not caching %s: %s", request.path, uncacheable)
            return uncacheable.response
        if isinstance(result.value, Deferred):
            response, frozen = result.value.payload
            slot.page = _Page(self, key, frozen=frozen, deferred=result.value)
            return cast(HttpResponseBase, response)
        slot.page = _Page(self, key, fresh_until=result.fresh_until)
        return _thaw_response(result.value)

    def render_for_refill(
        self,
        slot: PageSlot,
        holder: _RefillHolder,
        request: HttpRequest,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> HttpResponseBase:
        """Render live, without reading the cache, for a refill that dispatched this request."""
        key = self.key(request, args, kwargs)
        response = self.call(request, args, kwargs)
        try:
            frozen = _freeze_response(response)
        except UncacheableResponse as uncacheable:
            holder.reason = str(uncacheable)
            return response
        slot.page = _Page(self, key, frozen=frozen, holder=holder)
        return response

    def refill_spec(self, parts: dict[str, Any], *_: Any) -> _Refill | None:
        """Return the Celery refill of *parts*, or ``None`` when JSON cannot carry them (inline)."""
        return _Refill(self.path, parts) if _json_roundtrips(parts) else None

    @property
    def celery(self) -> bool:
        """Whether stale entries refill through Celery (else the claim holder renders inline)."""
        return self.engine.refill == "celery" and not self.credentials and "<locals>" not in self.path

    # -- the refill: a GET through the project's own WSGI application ---------------------------------

    def rebuild(self, arguments: Any) -> Callable[[], Any]:
        return functools.partial(_render_through_stack, self, arguments)


def _render_through_stack(view: _PageView, arguments: dict[str, Any]) -> Any:
    """Render a stale page for a refill through every middleware; return its storable form.

    Raise :class:`~django_scale.exceptions.PageRefillError` (a failed refill, retried with
    backoff) when the final response may not be stored or the request does not map to the
    key being refilled.
    """
    holder = _RefillHolder(view.key_of(arguments))
    environ = _refill_environ(view, arguments, holder)
    language = arguments.get("language")
    override: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if isinstance(language, str) and translation.check_for_language(language):
        # Without LocaleMiddleware the page renders in the active language, as it did when keyed.
        override = translation.override(language)
    with override:
        response = _wsgi_application()(environ, _start_response)
        status = getattr(response, "status_code", None)
        close = getattr(response, "close", None)
        if close is not None:
            close()  # request_finished: Django closes the connections as after any request
    if holder.value is None:
        reason = holder.reason or f"the view was not reached (status {status})"
        raise PageRefillError(
            f"The refill of {view.path} for {arguments.get('path')!r} stored nothing: {reason}."
        )
    return holder.value


def _wsgi_str(text: str) -> str:
    """Return *text* as a WSGI environ string (UTF-8 bytes read as Latin-1, PEP 3333)."""
    return text.encode("utf-8").decode("iso-8859-1")


def _refill_environ(view: _PageView, arguments: dict[str, Any], holder: _RefillHolder) -> dict[str, Any]:
    """Return the WSGI environ of a refill's GET: the key's parts, no cookies, no credentials."""
    secure = bool(arguments["secure"])
    host = str(arguments["host"])
    path, path_info = str(arguments["path"]), str(arguments["path_info"])
    script = path[: len(path) - len(path_info)] if path_info and path.endswith(path_info) else ""
    name, colon, port = host.rpartition(":")
    if not colon or "]" in port:
        name, port = host, "443" if secure else "80"
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": _wsgi_str(script),
        "PATH_INFO": _wsgi_str(path_info),
        "QUERY_STRING": str(arguments["query"]),
        "HTTP_HOST": host,
        "SERVER_NAME": name,
        "SERVER_PORT": port,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if secure else "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        REFILL_ENVIRON_KEY: holder,
    }
    for header, value in dict(arguments["headers"]).items():
        if value is not None and str(header).lower() not in _CREDENTIAL_HEADERS:
            meta = str(header).upper().replace("-", "_")
            environ[meta if meta in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{meta}"] = str(value)
    language = arguments.get("language")
    if isinstance(language, str) and "HTTP_ACCEPT_LANGUAGE" not in environ:
        environ["HTTP_ACCEPT_LANGUAGE"] = language
    proxy_header = settings.SECURE_PROXY_SSL_HEADER
    if secure and proxy_header:
        environ[proxy_header[0]] = proxy_header[1]
    return environ


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda data: None


# The project's WSGI application per MIDDLEWARE list (override_settings in tests changes it).
_applications: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _wsgi_application() -> Callable[..., Any]:
    from django.core.wsgi import get_wsgi_application

    middleware = tuple(settings.MIDDLEWARE or ())
    application = _applications.get(middleware)
    if application is None:
        application = _applications[middleware] = get_wsgi_application()
    return application


def swr_cache_page(
    fresh: float | None = None,
    stale: float | None = None,
    *,
    vary_on: Sequence[str] = (),
    stale_if_error: float = 0,
    cache: str | None = None,
    shared: bool = False,
    version: int | str = 1,
    refill: RefillMode = "celery",
    wait: float = 5.0,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Cache a view's GET responses with stale-while-revalidate, like ``cache_page``.

    Needs ``django_scale.middleware.ScaleMiddleware`` as the first entry of ``MIDDLEWARE``:
    the page is stored only if the *final* response, after every middleware, carries nothing
    of the visitor's (no cookie set, no CSRF token, no session read, no flash message, no
    ``Vary`` the key does not cover, no ``Authorization``; see docs/caching.md). Without it,
    pages are served uncached (check W210).

    The key is the view, the host, the path, the query string, the active language (with
    ``USE_I18N``) and the request headers named in *vary_on* (``"user"`` means the user's
    primary key; the response is then marked ``private``, and an anonymous visitor with a
    session is never served the anonymous entry). A request with an ``Authorization`` header
    is served uncached unless *vary_on* names it. *shared* says one response fits every user
    even though it read the session or varies on an unlisted header (never: cookies, CSRF
    token, messages). Stored pages go out with ``Cache-Control: max-age, stale-while-revalidate,
    stale-if-error`` (``public``, or ``private`` when the final response sets a cookie or the
    page varies on the user) and ``Vary`` on *vary_on*.

    Celery refills send a GET through the project's own WSGI application, every middleware
    included, with the key's host, path, query, language and *vary_on* headers and no cookies;
    the result is stored only if it passes the same test and maps to the same key. Pages whose
    key holds credentials (*vary_on* with ``"user"``, ``"Authorization"`` or ``"Cookie"``) and
    ``refill="inline"`` ones are refilled by the request that wins the claim, which renders
    the page live through its own middleware.
    """
    _validate(fresh, stale, stale_if_error, refill, "recompute", wait, 0.1, 60.0)

    def decorate(view: Callable[P, R]) -> Callable[P, R]:
        path = f"{view.__module__}.{view.__qualname__}"
        page = _PageView(view, path, version, vary_on, shared, stale_if_error)
        page.engine = _registered(
            Engine(
                path=path,
                fresh=fresh,
                stale=stale,
                stale_if_error=stale_if_error,
                cache=cache,
                refill=refill,
                wait=wait,
                # A page keyed by credentials is never refilled by Celery: a message is refused.
                rebuild=None if page.credentials else page.rebuild,
                key_of=page.key_of,
            )
        )
        page_paths.add(path)

        wrapper: Any
        if page.is_async:

            @functools.wraps(view)
            async def async_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
                return await sync_to_async(page.respond, thread_sensitive=True)(request, args, kwargs)

            wrapper = async_view
        else:

            @functools.wraps(view)
            def sync_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
                return page.respond(request, args, kwargs)

            wrapper = sync_view
        wrapper._django_scale_engine = page.engine
        wrapper._django_scale_page = page
        return cast("Callable[P, R]", wrapper)

    return decorate


def fragment_engine(fresh: float, stale: float, cache: str | None) -> Engine:
    """Return the engine of ``{% swrcache %}`` fragments: refilled inline by the claim holder."""
    return _fragment_engine(float(fresh), float(stale), cache)


@functools.lru_cache(maxsize=64)
def _fragment_engine(fresh: float, stale: float, cache: str | None) -> Engine:
    _validate(fresh, stale, 0, "inline", "recompute", 5.0, 0.1, 60.0)
    return Engine(
        path="django_scale.templatetags.swrcache", fresh=fresh, stale=stale, cache=cache, refill="inline"
    )


def _iter_engines() -> Iterator[Engine]:
    """Every registered engine (for the system checks)."""
    yield from list(registry.values())
