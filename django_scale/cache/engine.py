"""The engine: the stale-while-revalidate protocol for one key, with one set of options."""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

from django.db import transaction

from django_scale import metrics
from django_scale.cache import invalidations
from django_scale.cache.degrade import (
    CLAIM_MEMORY,
    breakers,
    local_forget,
    local_get,
    local_put,
    recent_claims,
    remember_claim,
    stripes,
    trip_cache,
)
from django_scale.cache.publisher import publisher
from django_scale.cache.store import BACKOFF_FIRST, MARKER, CacheDown, Envelope, Store, store_for
from django_scale.conf import conf, seconds_problem
from django_scale.exceptions import CacheArgumentError
from django_scale.replicas import current_state, forced_route, use_primary

logger = logging.getLogger("django_scale.cache")
T = TypeVar("T")


#: The fixed name of the Celery task that refills (defined in :mod:`django_scale.tasks`).
REFRESH_TASK = "django_scale.refresh"

RefillMode = Literal["celery", "inline"]
BrokerFallback = Literal["recompute", "serve_stale"]


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


class Refill(NamedTuple):
    """What the Celery task needs to recompute a key: a registered path and JSON-able arguments."""

    path: str
    arguments: Any


class LazyRefill:
    """The refill of a call, worked out only when a stale value needs one (off the hit path)."""

    __slots__ = ("args", "bound", "kwargs", "spec")

    def __init__(self, spec: Callable[..., Refill | None], args: Any, kwargs: Any, bound: Any) -> None:
        self.spec, self.args, self.kwargs, self.bound = spec, args, kwargs, bound

    def resolve(self) -> Refill | None:
        return self.spec(self.args, self.kwargs, self.bound)


def _resolve(refill: Refill | LazyRefill | None) -> Refill | None:
    return refill.resolve() if isinstance(refill, LazyRefill) else refill


async def awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _nothing() -> None:
    """Give up nothing (a deferred value computed without a claim)."""


#: Decorated functions and views by path, for the Celery task to find them.
registry: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
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

    def fetch(self, key: str, compute: Callable[[], Any], refill: Refill | LazyRefill | None) -> _Result:
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
        lazy_refill: Refill | LazyRefill | None,
    ) -> Deferred | None:
        # One claim attempt per process per stale window: the thread that marks the key first
        # asks Redis (where SET NX picks one winner across processes); the process's other
        # threads serve the stale value after their one GET.
        now = time.monotonic()
        seen = recent_claims.get((alias, key))
        if seen is not None and now < seen:
            metrics.increment("swr.refill.suppressed")
            return None
        remember_claim(alias, key, min(CLAIM_MEMORY, self.refill_timeout))
        token = secrets.token_hex(8)
        try:
            claimed = store.claim(key, token, self.refill_timeout, cold=False)
        except CacheDown as error:
            self._cache_down(alias, error)
            return None
        if claimed is None:
            metrics.increment("swr.refill.suppressed")
            return None
        generation = claimed.generation
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
        self, alias: str, key: str, token: str, generation: int, refill: Refill, primary: bool
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
        self, refill: Refill, key: str, token: str, generation: int, alias: str, primary: bool
    ) -> bool:
        """Send the refill to Celery as the task ``django_scale.refresh``; return whether it was sent.

        The task is sent by its fixed name, so the cache never imports ``django_scale.tasks``
        (which imports the cache). Celery is imported here, not with the module: a process
        whose refills are all inline never loads it.
        """
        from celery import current_app

        args = (refill.path, alias, key, token, generation, refill.arguments, primary)
        if current_app.conf.task_always_eager:
            # What apply_async() does in eager mode, and send_task() does not: run it here.
            metrics.increment("swr.refill.enqueued")
            if self.rebuild is not None:
                compute = self.rebuild(refill.arguments)
                self.run_refill(alias, key, token, generation, compute, primary=primary, swallow=True)
            return True
        try:
            current_app.send_task(REFRESH_TASK, args=args, retry=False)
        except Exception as error:
            breakers.trip("the Celery broker", error, conf.CACHE_RETRY_AFTER, metric="swr.broker_down")
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
                recent_claims.pop((alias, key), None)
            return envelope.fresh_until

        return commit

    def _release(self, alias: str, store: Store, key: str, token: str) -> None:
        """Give the claim *token* up and wake the waiters (a deferred value that was not stored)."""
        recent_claims.pop((alias, key), None)
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
        recent_claims.pop((alias, key), None)
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
                claimed = store.claim(key, token, self.refill_timeout, cold=True)
                if claimed is not None:
                    # Another caller may have written and let its claim go between our miss
                    # and our claim: look again before computing it a second time.
                    envelope = store.get(key) if claimed.written else None
                    if envelope is not None and time.time() < envelope.stale_until:
                        store.release(key, token)
                        return _Result(envelope.value, envelope.fresh_until)
                    return self._compute_and_write(alias, store, key, token, claimed.generation, compute, old)
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
        local_forget(alias)
        # Other processes may journal invalidations meanwhile: replay them once it answers.
        invalidations.mark_due(alias)
        trip_cache(alias, error)

    def _degraded(self, alias: str, key: str, compute: Callable[[], Any]) -> _Result:
        """Serve without the cache: compute at most once per process per key per ``fresh``."""
        found, value = local_get(alias, key, time.time())
        if found:
            return _Result(value, 0.0)
        with stripes[hash(key) % len(stripes)]:
            found, value = local_get(alias, key, time.time())
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
        local_put(alias, key, value, time.time() + fresh)
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
        :mod:`django_scale.cache.invalidations`) and replayed by whichever process reads the cache
        first once it answers.
        """
        alias = self.alias()
        local_forget(alias, key)
        recent_claims.pop((alias, key), None)
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


def validate_options(
    fresh: float | None,
    stale: float | None,
    stale_if_error: float,
    refill: str,
    on_broker_error: str,
    wait: float,
    jitter: float,
    refill_timeout: float,
) -> None:
    """Raise :class:`~django_scale.exceptions.CacheArgumentError` for an option out of range."""

    def number(name: str, value: object, *, allow_none: bool = False, allow_zero: bool = False) -> None:
        if value is None and allow_none:
            return
        problem = seconds_problem(value, zero_allowed=allow_zero)
        if problem is not None:
            raise CacheArgumentError(f"{name}= {problem.removeprefix('it ')}, not {value!r}.")

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


def iter_engines() -> Iterator[Engine]:
    """Every registered engine (for the system checks)."""
    yield from list(registry.values())
