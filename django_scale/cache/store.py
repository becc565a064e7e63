"""Stores: the SWR protocol's cache operations, on Redis (Lua scripts, blocking waits) or any Django cache."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from django.core.cache import BaseCache, caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django_redis.cache import RedisCache

from django_scale import metrics
from django_scale.exceptions import CacheArgumentError, CacheKeyError

if TYPE_CHECKING:
    from redis import Redis
    from redis.commands.core import Script

logger = logging.getLogger("django_scale.cache")
T = TypeVar("T")


#: First item of every envelope; a cached value without it is not ours and counts as a miss.
MARKER = "django_scale.swr.1"


#: First and longest wait, in seconds, before a failed refill is tried again.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0


class CacheDown(Exception):
    """The cache could not be reached (internal: opens the circuit breaker)."""


class Claim(NamedTuple):
    """A claim won: the key's generation, and whether the caller should look at the key again.

    ``written`` is true when the key may hold a value (on Redis: it has one at the claim),
    which a caller that held the claim may have written and let go between this caller's miss
    and its claim: the value is then served, not computed a second time.
    """

    generation: int
    written: bool


class Envelope(NamedTuple):
    marker: str
    value: Any
    created: float
    fresh_until: float
    stale_until: float


_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local written = 0
  if ARGV[3] == '1' then
    redis.call('DEL', KEYS[3])
    written = redis.call('EXISTS', KEYS[4])
  end
  return {tonumber(redis.call('GET', KEYS[2]) or '0'), written}
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
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('RPUSH', KEYS[2], '1')
redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""
_INVALIDATE = """
local generation = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
return generation
"""


def _sub(key: str, name: str) -> str:
    return f"{key}:{name}"


def claim_key(key: str) -> str:
    """The key of the refill claim of *key* (before the cache's ``make_key()``): held while
    one caller refills *key* (see :meth:`Store.claim`)."""
    return _sub(key, "claim")


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

    def ping(self) -> object:
        """Raise :class:`CacheDown` unless the cache answers (a read of a key nobody writes)."""
        return self._call(lambda: self.cache.get("django-scale:ping"))

    def claim(self, key: str, token: str, timeout: float, cold: bool) -> Claim | None:
        """Claim *key*'s computation (*cold*: the key is missing) or refill for *timeout* seconds."""

        def claim() -> Claim | None:
            if not self.cache.add(_sub(key, "claim"), token, timeout):
                return None
            # No record of wake-ups here: a cold claim always looks again.
            return Claim(int(self.cache.get(_sub(key, "gen"), 0)), cold)

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

    def ping(self) -> object:
        return self._call(lambda: self._redis().ping())

    def claim(self, key: str, token: str, timeout: float, cold: bool) -> Claim | None:
        # A cold claim clears the key's old wake-ups, and tells whether the key has a value
        # now (another caller wrote it since the miss, or it is one past stale): only then
        # does the miss look at the key again.
        keys = (_sub(key, "claim"), _sub(key, "gen"), _sub(key, "notify"), key)
        result = self._run(_CLAIM, keys, (token, _ms(timeout), "1" if cold else "0"))
        if not isinstance(result, list):
            return None
        return Claim(int(result[0]), bool(result[1]))

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
        # The claim goes and the waiters wake; no failure is counted (a refill's backoff).
        self._run(_RELEASE, (_sub(key, "claim"), _sub(key, "notify")), (token, _ms(60)))

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


def _on_one_redis_server(cache: BaseCache) -> bool:
    """Whether *cache* is django-redis with a client that keeps every key on one server.

    The default client and its Sentinel subclass do; the sharded client spreads keys over
    servers and the herd client packs values its own way, and the Lua scripts need neither.
    """
    if not isinstance(cache, RedisCache):
        return False
    # Imported here: the clients import redis-py (0.2 s), which a process whose caches are
    # not django-redis never needs; this cache's client has imported it already.
    from django_redis.client import DefaultClient, HerdClient, ShardClient

    client = cache.client
    return isinstance(client, DefaultClient) and not isinstance(client, (HerdClient, ShardClient))


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
        if _on_one_redis_server(cache):
            store = RedisStore(cache)
            _redis_stores[alias] = (current, store)
        else:
            store = Store(cache)
        cache._django_scale_swr_store = store  # type: ignore[attr-defined]
    return store
