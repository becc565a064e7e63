"""Replica health shared between the processes of a host, through the cache, off the probes."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter

from django.core.cache import caches

from django_scale import metrics
from django_scale.breakers import Breakers
from django_scale.conf import conf

__all__ = ["SharedHealth", "shared_health"]

logger = logging.getLogger("django_scale.replicas")


def _shared_key(replica: str) -> str:
    return f"django_scale:replica-down:{replica}"


class SharedHealth:
    """The replicas' ejections as the processes share them through one cache, kept off the probes.

    One thread per cache alias and process makes every call on the cache, one at a time: it
    writes this process's ejections (:meth:`publish`, :meth:`clear`) and reads the other
    processes' (:meth:`request`). A monitor waits for a read it asked for at most
    :attr:`timeout` seconds, after its probe; a request never waits. A cache that fails, or does
    not answer within :attr:`timeout`, is skipped for ``CACHE_RETRY_AFTER`` seconds (a circuit
    breaker): the monitors then go by what this process knows, and a call stuck on a hung
    server is never joined by another.
    """

    #: The longest a monitor waits for the cache after a probe, in seconds. A quarter of
    #: ``REPLICA_DEADLINE`` if that is shorter, so waiting never makes a replica look stale.
    max_wait = 0.1
    #: How long this process's first call on the cache may take before it counts as an outage,
    #: in seconds. The first call also opens the connection and loads the cache's client
    #: (django-redis imports redis-py then), which on a busy host alone can take longer than
    #: :attr:`timeout`: a monitor still waits only :attr:`timeout` for it, but not answering
    #: in that time is not yet an outage.
    first_call_grace = 1.0

    def __init__(self, alias: str) -> None:
        #: The alias of the cache in ``CACHES``.
        self.alias = alias
        self._lock = threading.Condition(threading.Lock())
        # Per replica: the ejection to write (its end in time.time() terms, or None to
        # delete it), and until when (time.time()) the write still matters.
        self._writes: dict[str, tuple[float | None, float]] = {}
        self._reads: set[str] = set()
        # The end (time.time()) of each replica's shared ejection as last known, 0.0 for none.
        self._known: dict[str, float] = {}
        # Bumped by each write of this process, so that a read sent before it cannot undo it.
        self._writes_made: Counter[str] = Counter()
        self._cycles_started = 0
        self._cycles_done = 0
        self._read_cycle = 0
        self._call_since: float | None = None
        # Whether a call on the cache has ever returned (see first_call_grace).
        self._answered_once = False
        # The circuit breaker of the cache: only a call that succeeds ends an outage, so the
        # thread waits out the breaker's time and then tries the cache again.
        self._breakers = Breakers(logger, close_on_expiry=False)
        self._name = f"the cache {alias!r}, where the replica monitors share their state,"
        self._thread: threading.Thread | None = None

    @property
    def timeout(self) -> float:
        """How long a monitor waits for a read it asked for, in seconds."""
        return min(self.max_wait, conf.REPLICA_DEADLINE / 4)

    # Called by the monitors and the request path: no I/O, and the lock is held only briefly.

    def request(self, replica: str) -> int | None:
        """Ask for a fresh read of *replica*'s shared ejection; return the ticket to :meth:`wait` for.

        Return ``None``, asking nothing, while the cache is skipped.
        """
        call_since = self._call_since
        limit = self.timeout if self._answered_once else max(self.timeout, self.first_call_grace)
        if call_since is not None and time.monotonic() - call_since > limit:
            self._trip(f"it has not answered for {limit * 1000:.0f} ms")
        with self._lock:
            if self._breakers.is_open(self._name):
                return None
            self._reads.add(replica)
            self._wake()
            return self._cycles_started + 1

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the read of *ticket*; return whether it succeeded.

        A read that does not come in time trips the circuit breaker, except while the process's
        first call on the cache is within :attr:`first_call_grace`.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._cycles_done < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            else:
                return self._read_cycle >= ticket
        if self._answered_once:
            self._trip(f"it did not answer within {timeout * 1000:.0f} ms")
        # Else the first call may still be connecting; request() trips it past the grace.
        return False

    def down_until(self, replica: str) -> float:
        """Return the end (``time.time()``) of *replica*'s shared ejection as last known, or ``0.0``."""
        return self._known.get(replica, 0.0)

    def publish(self, replica: str, until: float) -> None:
        """Tell the other processes that *replica* takes no reads until *until* (``time.time()``)."""
        self._write(replica, until, until)

    def clear(self, replica: str) -> None:
        """Tell the other processes that *replica* may take reads again."""
        # Past the longest an ejection is kept, there is nothing left to delete.
        self._write(replica, None, time.time() + math.ceil(conf.REPLICA_RETRY_AFTER))

    def _write(self, replica: str, until: float | None, matters_until: float) -> None:
        with self._lock:
            # One pending write per replica, the latest: a hung cache cannot pile them up.
            self._writes[replica] = (until, matters_until)
            self._known[replica] = until or 0.0
            self._writes_made[replica] += 1
            self._wake()

    def in_flight(self) -> bool:
        """Whether a call on the cache is under way (for tests)."""
        return self._call_since is not None

    def flush(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds until every write is done; return whether they are."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._writes or self._cycles_started != self._cycles_done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def _wake(self) -> None:
        # Called with the lock held.
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"django-scale-shared-health-{self.alias}", daemon=True
            )
            self._thread.start()
        self._lock.notify_all()

    def _trip(self, reason: str) -> None:
        """Skip the cache for ``CACHE_RETRY_AFTER`` after *reason*; count each outage once.

        Called without the lock: an outage's start is logged. Meanwhile each process goes by
        its own view of the replicas.
        """
        if self._breakers.trip(self._name, reason, conf.CACHE_RETRY_AFTER):
            metrics.increment("replicas.cache_down")

    # The thread.

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    pending = bool(self._writes or self._reads)
                    left = self._breakers.open_until(self._name) - time.monotonic()
                    if pending and left <= 0:
                        break
                    self._lock.wait(left if pending else None)
                writes, self._writes = self._writes, {}
                reads, self._reads = sorted(self._reads), set()
                made = {replica: self._writes_made[replica] for replica in reads}
                self._cycles_started += 1
                cycle = self._cycles_started
            found, error = self._exchange(writes, reads)
            # The breaker opens (or closes) before the waiters of this cycle wake.
            if error is not None:
                self._trip(f"{type(error).__name__}: {str(error).strip()}")
            else:
                self._breakers.close(self._name)
            with self._lock:
                if error is not None:
                    for replica, write in writes.items():
                        # Written again after the outage, unless a newer write replaced it.
                        self._writes.setdefault(replica, write)
                else:
                    for replica in reads:
                        if self._writes_made[replica] == made[replica]:
                            self._known[replica] = found.get(replica, 0.0)
                    self._read_cycle = cycle
                self._cycles_done = cycle
                self._lock.notify_all()

    def _exchange(
        self, writes: dict[str, tuple[float | None, float]], reads: list[str]
    ) -> tuple[dict[str, float], BaseException | None]:
        """Make this cycle's calls on the cache; return what was read, or the error."""
        found: dict[str, float] = {}
        try:
            cache = caches[self.alias]
            for replica, (until, matters_until) in writes.items():
                wall = time.time()
                if wall >= matters_until:
                    continue
                self._call_since = time.monotonic()
                if until is None:
                    cache.delete(_shared_key(replica))
                else:
                    cache.set(_shared_key(replica), until, math.ceil(until - wall))
                self._answered_once = True
            if reads:
                self._call_since = time.monotonic()
                values = cache.get_many([_shared_key(replica) for replica in reads])
                self._answered_once = True
                for replica in reads:
                    value = values.get(_shared_key(replica))
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        found[replica] = float(value)
        except Exception as error:  # any failure of the cache is an outage of it
            return found, error
        finally:
            self._call_since = None
        return found, None


_sharing: dict[str, SharedHealth] = {}
_sharing_lock = threading.Lock()


def shared_health(alias: str | None = None) -> SharedHealth:
    """Return this process's :class:`SharedHealth` on cache *alias* (by default ``CACHE_ALIAS``)."""
    alias = conf.CACHE_ALIAS if alias is None else alias
    found = _sharing.get(alias)
    if found is None:
        with _sharing_lock:
            found = _sharing.setdefault(alias, SharedHealth(alias))
    return found


def _forget_after_fork() -> None:
    # A forked worker (gunicorn, Celery's prefork pool) inherits the SharedHealth objects but
    # not their threads or locks: start afresh in the child.
    global _sharing_lock
    _sharing.clear()
    _sharing_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
