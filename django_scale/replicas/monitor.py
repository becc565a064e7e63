"""Where reads may go: the routing state of a request, and the health of each replica.

Three kinds of state live here:

* :class:`RoutingState`, one per request (or Celery task), kept in a :mod:`contextvars`
  variable so that threads and async tasks never see each other's. It carries the WAL
  position the user's own last write reached and whether this request has written.
* :class:`ReplicaMonitor`, one per replica per process. A daemon thread probes its replica
  every ``HEALTH_CHECK_INTERVAL`` seconds, on a connection of its own, and records the replay
  position, the lag and whether the replica answered. The request path only reads what the
  monitors recorded: a routing decision does no I/O, and a frozen replica cannot hold a
  request for longer than ``REPLICA_DEADLINE``.
* :class:`SharedHealth`, one per cache alias per process. Its thread tells the other
  processes through the cache which replicas this one ejected, and learns theirs. A request
  never waits on the cache, and a monitor only briefly, after its probe: a hung Redis leaves
  routing as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import math
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar, cast, overload

from django.core.cache import caches
from django.db import DatabaseError, InterfaceError, InternalError, OperationalError, connections

from django_scale import metrics
from django_scale.conf import conf

__all__ = [
    "STICKY_PRIMARY",
    "FallbackWindow",
    "ReplicaGuard",
    "ReplicaMonitor",
    "RoutingState",
    "SharedHealth",
    "await_replica",
    "current_state",
    "decode_position",
    "format_lsn",
    "guard_replicas",
    "mark_write",
    "monitor",
    "parse_lsn",
    "routing_state",
    "shared_health",
    "use_primary",
    "use_replica",
]

logger = logging.getLogger("django_scale.replicas")

P = ParamSpec("P")
R = TypeVar("R")


# -- WAL positions -------------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """Return the PostgreSQL WAL position ``"16/B374D848"`` as an integer."""
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not a PostgreSQL LSN such as '16/B374D848'")
    return (int(high, 16) << 32) + int(low, 16)


def format_lsn(value: int) -> str:
    """Return the integer WAL position *value* in PostgreSQL's ``"16/B374D848"`` form."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# -- The state of one request --------------------------------------------------------------


@dataclass
class RoutingState:
    """What routing needs to know about one request or task. Open it with :func:`routing_state`."""

    #: The WAL position the user's last write reached; reads must see at least this much.
    required_lsn: int | None = None
    #: Whether the user's last write must be read from the primary because the primary
    #: cannot tell a WAL position (a database other than PostgreSQL).
    sticky_primary: bool = False
    #: Whether this request has written; its later reads stay on the primary.
    wrote: bool = False
    #: Why reads of this request go to the primary, or ``""`` while they may use a replica.
    pinned: str = ""
    #: The replica this request reads from, chosen once so that its reads agree.
    replica: str | None = None
    #: How many read decisions went to each alias (for tests, metrics and benchmarks).
    reads: Counter[str] = field(default_factory=Counter)

    def pin(self, reason: str) -> None:
        """Send the rest of this request's reads to the primary, for *reason*."""
        if not self.pinned:
            self.pinned = reason

    #: Until when (``time.monotonic()``) the chosen replica's availability holds unless its
    #: monitor learns something new (its version changes).
    _valid_until: float = field(default=0.0, repr=False)
    _connections: tuple[Any, ...] = field(default=(), repr=False)
    _version: int = field(default=-1, repr=False)

    def choose_replica(self, replicas: tuple[str, ...]) -> str | None:
        """Return the replica this request may read from, or ``None`` for the primary (no I/O)."""
        now = time.monotonic()
        if self.replica is not None:
            item = monitor(self.replica)
            if self._version == item.version and now < self._valid_until:
                return self.replica
            version = item.version
            available, until = item.availability(now, self.required_lsn)
            if available:
                self._version, self._valid_until = version, until
                return self.replica
        candidates = [alias for alias in replicas if monitor(alias).is_available(now, self.required_lsn)]
        self.replica = pick_usable(candidates)
        self._version = -1
        return self.replica


_state: contextvars.ContextVar[RoutingState | None] = contextvars.ContextVar(
    "django_scale_routing_state", default=None
)
_forced: contextvars.ContextVar[Literal["primary", "replica"] | None] = contextvars.ContextVar(
    "django_scale_forced_route", default=None
)

#: Counters that :func:`django_scale.testing.capture_reads` hands to tests.
_capture: contextvars.ContextVar[Counter[str] | None] = contextvars.ContextVar(
    "django_scale_capture_reads", default=None
)


def current_state() -> RoutingState | None:
    """Return the routing state of the current request or task, or ``None`` outside one."""
    return _state.get()


@contextmanager
def routing_state(required_lsn: int | None = None, *, sticky_primary: bool = False) -> Iterator[RoutingState]:
    """Open a :class:`RoutingState` for the code inside the block, and close it after.

    :class:`~django_scale.middleware.ScaleMiddleware` opens one per request and the Celery
    integration one per task; open one yourself around any other unit of work that should
    read its own writes.
    """
    state = RoutingState(required_lsn=required_lsn, sticky_primary=sticky_primary)
    if sticky_primary:
        state.pin("the user wrote recently and the primary has no WAL position to wait for")
    token = _state.set(state)
    try:
        yield state
    finally:
        _state.reset(token)


def mark_write(alias: str | None = None) -> None:
    """Record that the current request wrote, so its later reads and the user's next ones see it.

    :class:`~django_scale.routers.ReplicaRouter` calls this for every ORM write. Call it
    yourself after writing with raw SQL through ``connection.cursor()``.
    """
    state = _state.get()
    if state is not None and (alias is None or alias == conf.PRIMARY):
        state.wrote = True
        state.pin("this request wrote")


#: The value of a read-your-writes cookie or task header that means "read from the primary":
#: the user wrote, but the primary has no WAL position to wait for.
STICKY_PRIMARY = "primary"


def decode_position(value: str | None) -> tuple[int | None, bool]:
    """Decode a cookie or header value: the WAL position to wait for, and whether to stick to the primary.

    ``None`` means no recent write; a malformed value sticks to the primary, which is slower
    but never stale.
    """
    if value is None:
        return None, False
    if value == STICKY_PRIMARY:
        return None, True
    try:
        return parse_lsn(value), False
    except ValueError:
        return None, True


def await_replica(state: RoutingState, reason: str) -> None:
    """Find a replica that has replayed *state*'s required position within ``REPLICA_WAIT``, or pin.

    Called once when a request or task opens its state, so that its reads need no I/O later.
    """
    if state.required_lsn is None:
        return
    replicas = list(conf.REPLICAS)
    alias = wait_for_replicas(replicas, state.required_lsn, conf.REPLICA_WAIT) if replicas else None
    if alias is None:
        state.pin(reason)
    else:
        state.replica = alias


@contextmanager
def guard_replicas() -> Iterator[None]:
    """Wrap the queries on each replica inside the block in a :class:`ReplicaGuard`."""
    with contextlib.ExitStack() as stack:
        for alias in conf.REPLICAS:
            stack.enter_context(connections[alias].execute_wrapper(ReplicaGuard(alias)))
        yield


# -- use_primary() / use_replica() ---------------------------------------------------------


class _Route:
    """A context manager and decorator that forces where reads go while it is active."""

    def __init__(self, target: Literal["primary", "replica"]) -> None:
        self.target = target
        self._tokens: list[contextvars.Token[Literal["primary", "replica"] | None]] = []

    def __enter__(self) -> None:
        self._tokens.append(_forced.set(self.target))

    def __exit__(self, *exc_info: object) -> None:
        _forced.reset(self._tokens.pop())

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...

    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        target = self.target
        # Each call enters a fresh instance: the decorated function may run in many threads
        # and tasks at once, and each must restore its own context.
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with _Route(target):
                    return await func(*args, **kwargs)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            with _Route(target):
                return func(*args, **kwargs)

        return wrapper


def use_primary() -> _Route:
    """Send every read inside the block (or decorated function) to the primary.

    Use it for reads that must be exact, such as a check before a write. It nests with
    :func:`use_replica`: the innermost block wins, and each restores the outer one on exit.
    """
    return _Route("primary")


def use_replica() -> _Route:
    """Send reads inside the block to a replica even if this request wrote.

    For reads that may be a little stale, such as reports. Reads still go to the primary
    inside ``atomic()`` and when no replica is available.
    """
    return _Route("replica")


def forced_route() -> Literal["primary", "replica"] | None:
    """Return the target of the innermost active :func:`use_primary` / :func:`use_replica`."""
    return _forced.get()


# -- Replica health ------------------------------------------------------------------------

# One probe: replay position, and whether the standby has replayed all it has received.
# The replay timestamp is the primary's commit time of the last replayed transaction.
_PROBE_SQL = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
            ELSE pg_current_wal_insert_lsn() END::text,
       pg_last_wal_receive_lsn()::text,
       EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8,
       pg_postmaster_start_time()::text || ' ' || current_setting('port')
"""
# The identity of a server: when it started, and its port.
_IDENTITY_SQL = "SELECT pg_postmaster_start_time()::text || ' ' || current_setting('port')"

_progress = threading.Condition()
_monitors: dict[str, ReplicaMonitor] = {}
_monitors_lock = threading.Lock()


class ReplicaMonitor:
    """The health of one replica as seen by this process, kept fresh by a daemon thread."""

    def __init__(self, alias: str) -> None:
        #: The database alias of the replica.
        self.alias = alias
        #: The highest WAL position this replica has been seen to have replayed.
        self.replay_lsn = 0
        #: Replication lag in seconds at the last probe, ``None`` before the first.
        self.lag: float | None = None
        #: ``time.monotonic()`` of the last probe that answered.
        self.checked_at = 0.0
        #: ``time.monotonic()`` before which the replica takes no reads (it failed a probe).
        self.down_until = 0.0
        #: The error of the last failed probe.
        self.error: str = ""
        self.probes = 0
        #: Bumped whenever what the monitor knows changes, so cached decisions are re-checked.
        self.version = 0
        #: How many times the replica has failed; connections opened before the last failure
        #: are not trusted.
        self.failures = 0
        self._caught_up_at = 0.0
        # Until when (time.monotonic()) this process ejected the replica itself, and the end of
        # that ejection (time.time()) as it told the other processes.
        self._ejected_until = 0.0
        self._published = 0.0
        self._busy_since: float | None = None
        self._waiters = 0
        self._wake = threading.Event()
        self._first = threading.Event()
        self._connection: Any = None
        self._vendor = connections[alias].vendor
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._logged: str = ""
        self._stopped = False
        self._primary_id: str | None = None

    # The request path: reads only, no I/O.

    def is_available(self, now: float | None = None, required_lsn: int | None = None) -> bool:
        """Whether this replica may take a read now (and has replayed *required_lsn*)."""
        return self.availability(time.monotonic() if now is None else now, required_lsn)[0]

    def availability(self, now: float, required_lsn: int | None = None) -> tuple[bool, float]:
        """Return whether the replica may take a read, and until when that holds at the latest.

        The answer stays true until the returned time unless :attr:`version` changes first.
        """
        if self._vendor != "postgresql":
            # Nothing to probe: a replica of another database is trusted as configured.
            return required_lsn is None, math.inf
        self._ensure_started()
        if not self._first.is_set():
            # The first use in this process waits for one probe, within the deadline.
            self._first.wait(conf.REPLICA_DEADLINE)
        if self.is_unresponsive(now):
            return False, now
        deadline = conf.REPLICA_DEADLINE
        busy_since = self._busy_since
        # Without a fresh probe the replica may have frozen: trust the last one for so long.
        fresh_until = self.checked_at + conf.HEALTH_CHECK_INTERVAL + deadline
        if not self.checked_at or now > fresh_until:
            return False, now
        if self.lag is None or self.lag > conf.MAX_REPLICA_LAG:
            return False, now
        if required_lsn is not None and self.replay_lsn < required_lsn:
            return False, now
        if busy_since is not None:
            fresh_until = min(fresh_until, busy_since + deadline)
        return True, fresh_until

    def is_unresponsive(self, now: float | None = None) -> bool:
        """Whether the replica failed, or a probe has hung past ``REPLICA_DEADLINE`` (frozen)."""
        now = time.monotonic() if now is None else now
        busy_since = self._busy_since
        return now < self.down_until or (busy_since is not None and now - busy_since > conf.REPLICA_DEADLINE)

    def report_failure(self, error: BaseException | str) -> None:
        """Take the replica out of rotation after a query or connection on it failed (no I/O)."""
        self._fail(error if isinstance(error, str) else f"{type(error).__name__}: {str(error).strip()}")
        self.version += 1
        self._wake.set()

    def wait_for(self, lsn: int, timeout: float) -> bool:
        """Wait up to *timeout* seconds for this replica to replay *lsn*; return whether it did."""
        if self.replay_lsn >= lsn:
            return True
        return wait_for_replicas([self.alias], lsn, timeout) == self.alias

    # The monitor thread.

    def _ensure_started(self) -> None:
        if self._thread is not None or self._vendor != "postgresql":
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"django-scale-monitor-{self.alias}", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the monitor thread and close its connection (for tests and shutdown)."""
        self._stopped = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return  # Stuck on a frozen replica; it is a daemon thread and goes with the process.
        self._close()

    def _run(self) -> None:
        while not self._stopped:
            self.probe()
            self._first.set()
            if self._waiters:
                # A request waits for this replica to replay its user's write: look again soon.
                time.sleep(0.001)
                continue
            self._wake.wait(conf.HEALTH_CHECK_INTERVAL)
            self._wake.clear()

    def _primary_identity(self) -> str | None:
        """Return the primary's identity (once per monitor), or ``None`` if it cannot be read."""
        if self._primary_id is None:
            try:
                raw = self._connect(conf.PRIMARY)
                try:
                    cursor = raw.cursor()
                    cursor.execute(_IDENTITY_SQL)
                    self._primary_id = str(cursor.fetchone()[0])
                finally:
                    raw.close()
            except Exception:
                logger.warning("could not read the identity of the primary %r", conf.PRIMARY, exc_info=True)
                return None
        return self._primary_id

    def _connect(self, alias: str | None = None) -> Any:
        wrapper = connections[alias or self.alias]
        params = wrapper.get_connection_params()
        # libpq's connect_timeout counts whole seconds and ignores values below 2.
        params.setdefault("connect_timeout", max(2, math.ceil(conf.REPLICA_DEADLINE)))
        # A connection of the monitor's own, straight from the driver: never one of a
        # connection pool (OPTIONS["pool"], Django 5.1+), which it would hold forever.
        raw = cast(Any, wrapper).Database.connect(**params)
        raw.autocommit = True
        return raw

    def probe(self) -> None:
        """Ask the replica for its replay position and lag, on this monitor's own connection.

        Only the queries count as the probe being busy (and so, past ``REPLICA_DEADLINE``, as
        the replica being unresponsive). What other processes shared through the cache is read
        alongside by :class:`SharedHealth`'s thread, and waited for only briefly afterwards.
        """
        sharing = shared_health()
        ticket = sharing.request(self.alias)
        measured: tuple[int, int | None, float | None] | None = None
        failure = ""
        self._busy_since = time.monotonic()
        try:
            if self._connection is None:
                self._connection = self._connect()
            cursor = self._connection.cursor()
            try:
                cursor.execute(_PROBE_SQL)
                in_recovery, replay, receive, replay_age, identity = cursor.fetchone()
            finally:
                cursor.close()
            if not in_recovery and identity == self._primary_identity():
                # The alias points at the primary itself (as TEST["MIRROR"] does in a test
                # suite): it has every write the moment it is committed.
                measured = (parse_lsn(replay), None, 0.0)
            elif not in_recovery or replay is None:
                failure = "it is not a streaming standby of the primary (pg_is_in_recovery() is false)"
            else:
                measured = (parse_lsn(replay), parse_lsn(receive) if receive else None, replay_age)
        except Exception as exc:  # any failure makes the replica unavailable
            self._close()
            failure = f"{type(exc).__name__}: {str(exc).strip()}"
        finally:
            answered = time.monotonic()
            self._busy_since = None
        try:
            if measured is None:
                self._fail(failure)
            else:
                # Outside the probe's deadline: a slow or hung cache delays this by at most
                # SharedHealth.timeout, and from then on is skipped for a while.
                if ticket is not None:
                    sharing.wait(ticket, sharing.timeout)
                self._record(*measured, answered, sharing.down_until(self.alias))
        finally:
            self.probes += 1
            self.version += 1
            with _progress:
                _progress.notify_all()

    def _record(
        self, replay: int, receive: int | None, replay_age: float | None, now: float, shared: float
    ) -> None:
        self.replay_lsn = max(self.replay_lsn, replay)
        if receive is None or replay >= receive:
            self._caught_up_at = now
        # Lag is how long the standby has been behind: since it last had replayed all it had
        # received, or since the last transaction it replayed, whichever is shorter. The first
        # alone overstates lag on a busy primary, the second after an idle spell.
        behind = now - self._caught_up_at
        self.lag = min(behind, replay_age) if replay_age is not None else behind
        self.checked_at = now
        # This process's own ejection holds whatever the cache says (it may not have been told),
        # and so does one another process shared (*shared*, in time.time() terms).
        shared_until = time.monotonic() + (shared - time.time()) if shared else 0.0
        until = max(self._ejected_until, shared_until)
        self.down_until = until if until > now else 0.0
        if self.lag > conf.MAX_REPLICA_LAG:
            self._log_once("lagging", f"replica {self.alias!r} lags {self.lag:.1f} s; it takes no reads")
        elif self.down_until:
            if shared > self._published and shared_until > now:
                self._log_once("shared", f"replica {self.alias!r} was ejected by another process")
            # Otherwise it is still ejected by this process, as logged when it failed.
        else:
            self._log_once("", f"replica {self.alias!r} takes reads again")
            self.error = ""

    def _fail(self, error: str) -> None:
        retry_after = conf.REPLICA_RETRY_AFTER
        self.error = error
        self.failures += 1
        # Only a probe that answers after the failure lets the replica take reads again.
        self.checked_at = 0.0
        self._ejected_until = self.down_until = time.monotonic() + retry_after
        self._log_once("down", f"replica {self.alias!r} ejected for {retry_after:g} s: {error}")
        # Tell the other processes, so they skip the replica without waiting for a probe. Only
        # queued here: SharedHealth's thread writes it, so a hung cache holds no request.
        self._published = time.time() + retry_after
        shared_health().publish(self.alias, self._published)

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            # It is broken already; closing is only to free the socket.
            with contextlib.suppress(Exception):
                connection.close()

    def _log_once(self, condition: str, message: str) -> None:
        # Log each change of condition once, not on every probe.
        if condition != self._logged:
            if condition or self._logged:
                (logger.warning if condition else logger.info)(message)
            self._logged = condition

    def forget_ejection(self) -> None:
        """Let the replica take reads again at the next probe (tests and ``scale_status``)."""
        self._ejected_until = self.down_until = 0.0
        self.version += 1
        shared_health().clear(self.alias)
        self._wake.set()


def monitor(alias: str) -> ReplicaMonitor:
    """Return this process's :class:`ReplicaMonitor` of replica *alias*."""
    found = _monitors.get(alias)
    if found is not None:
        return found
    with _monitors_lock:
        if alias not in _monitors:
            _monitors[alias] = ReplicaMonitor(alias)
        return _monitors[alias]


def wait_for_replicas(aliases: list[str], lsn: int, timeout: float) -> str | None:
    """Wait up to *timeout* seconds for one of *aliases* to replay *lsn*; return it or ``None``."""
    deadline = time.monotonic() + timeout
    monitors = [monitor(alias) for alias in aliases]
    # Outside the lock: a first use waits for the monitor's first probe, which notifies under it.
    ready = [item.alias for item in monitors if item.is_available(None, lsn)]
    if ready:
        return random.choice(ready)
    for item in monitors:
        item._waiters += 1
        item._wake.set()
    try:
        with _progress:
            while True:
                now = time.monotonic()
                ready = [item.alias for item in monitors if item.is_available(now, lsn)]
                if ready:
                    return random.choice(ready)
                if now >= deadline:
                    return None
                _progress.wait(deadline - now)
    finally:
        for item in monitors:
            item._waiters -= 1


# -- Replica health shared between processes ------------------------------------------------


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
        self._skip_until = 0.0
        self._outage = False
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
        with self._lock:
            now = time.monotonic()
            call_since = self._call_since
            outage = call_since is not None and now - call_since > self.timeout and self._trip()
            if now < self._skip_until:
                ticket = None
            else:
                self._reads.add(replica)
                self._wake()
                ticket = self._cycles_started + 1
        if outage:
            self._report_outage(f"it has not answered for {self.timeout * 1000:.0f} ms")
        return ticket

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the read of *ticket*; return whether it succeeded.

        A read that does not come in time trips the circuit breaker.
        """
        deadline = time.monotonic() + timeout
        outage = False
        with self._lock:
            while self._cycles_done < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outage = self._trip()
                    break
                self._lock.wait(remaining)
            else:
                return self._read_cycle >= ticket
        if outage:
            self._report_outage(f"it did not answer within {timeout * 1000:.0f} ms")
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

    def _trip(self) -> bool:
        """Skip the cache for ``CACHE_RETRY_AFTER``; return whether an outage starts (lock held)."""
        self._skip_until = time.monotonic() + conf.CACHE_RETRY_AFTER
        starts, self._outage = not self._outage, True
        return starts

    def _report_outage(self, reason: str) -> None:
        metrics.increment("replicas.cache_down")
        logger.warning(
            "the cache %r, where the replica monitors share their state, failed (%s); "
            "each process goes by its own view of the replicas, and tries again in %g s",
            self.alias,
            reason,
            conf.CACHE_RETRY_AFTER,
        )

    # The thread.

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    pending = bool(self._writes or self._reads)
                    left = self._skip_until - time.monotonic()
                    if pending and left <= 0:
                        break
                    self._lock.wait(left if pending else None)
                writes, self._writes = self._writes, {}
                reads, self._reads = sorted(self._reads), set()
                made = {replica: self._writes_made[replica] for replica in reads}
                self._cycles_started += 1
                cycle = self._cycles_started
            found, error = self._exchange(writes, reads)
            with self._lock:
                outage = recovered = False
                if error is not None:
                    for replica, write in writes.items():
                        # Written again after the outage, unless a newer write replaced it.
                        self._writes.setdefault(replica, write)
                    outage = self._trip()
                else:
                    for replica in reads:
                        if self._writes_made[replica] == made[replica]:
                            self._known[replica] = found.get(replica, 0.0)
                    self._read_cycle = cycle
                    recovered, self._outage = self._outage, False
                self._cycles_done = cycle
                self._lock.notify_all()
            if outage:
                self._report_outage(f"{type(error).__name__}: {str(error).strip()}")
            elif recovered:
                logger.info("the cache %r answers again; the replica monitors share their state", self.alias)

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
            if reads:
                self._call_since = time.monotonic()
                values = cache.get_many([_shared_key(replica) for replica in reads])
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


def shared_health(alias: str | None = None) -> SharedHealth:
    """Return this process's :class:`SharedHealth` on cache *alias* (by default ``CACHE_ALIAS``)."""
    alias = conf.CACHE_ALIAS if alias is None else alias
    found = _sharing.get(alias)
    if found is None:
        with _monitors_lock:
            found = _sharing.setdefault(alias, SharedHealth(alias))
    return found


class FallbackWindow:
    """Counts, per second and per process, the free reads and those that fell back to the primary.

    A free read has no read-your-writes requirement; the replicas serve it unless none is
    available. When ``PRIMARY_FALLBACK_CAP`` is below 1, at most that share of a second's free
    reads may go to the primary; the rest go to a replica that is reachable but lags, so
    that lagging replicas cannot move the whole read load onto the primary at once.
    """

    def __init__(self) -> None:
        self.second = 0
        self.reads = 0
        self.fallbacks = 0
        #: Free reads served by a lagging replica because of the cap (for tests and metrics).
        self.capped = 0

    def count_read(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            self.second, self.reads, self.fallbacks = second, 0, 0
        self.reads += 1

    def may_fall_back(self, cap: float) -> bool:
        if cap >= 1.0 or self.fallbacks + 1 <= cap * self.reads:
            self.fallbacks += 1
            return True
        return False


#: The process's :class:`FallbackWindow`.
fallback_window = FallbackWindow()


def free_read_alias(replicas: tuple[str, ...], chosen: str | None, primary: str, now: float) -> str:
    """Return where a free read goes, given the replica routing *chosen* (``None``: none)."""
    window = fallback_window
    window.count_read(now)
    if chosen is not None:
        return chosen
    cap = conf.PRIMARY_FALLBACK_CAP
    if window.may_fall_back(cap):
        return primary
    # Over the cap: a replica that answers but lags serves it, stale but without load on the primary.
    reachable = [
        alias for alias in replicas if not monitor(alias).is_unresponsive(now) and monitor(alias).checked_at
    ]
    alias = pick_usable(reachable)
    if alias is None:
        window.fallbacks += 1
        return primary
    window.capped += 1
    return alias


def pick_usable(aliases: list[str]) -> str | None:
    """Return one of *aliases* at random whose connection opens, or ``None``.

    A replica's connection in this thread opens here, before the router hands out its alias,
    rather than in the middle of the caller's query: a refused connection takes the replica
    out of rotation and the read goes elsewhere instead of failing. An open connection is
    not tested again (that would cost a round trip per request).
    """
    aliases = list(aliases)
    random.shuffle(aliases)
    for alias in aliases:
        connection = connections[alias]
        item = monitor(alias)
        if connection.connection is not None:
            mark = getattr(connection, "_django_scale_epoch", None)
            if connection.errors_occurred or (
                item.failures and mark != (id(connection.connection), item.failures)
            ):
                # Opened before the replica last failed (say, it restarted since), or a query
                # on it failed: it is likely broken, so open a new one rather than find out
                # in the middle of the caller's query.
                with contextlib.suppress(Exception):
                    connection.close()
        if connection.connection is None:
            try:
                connection.ensure_connection()
            except DatabaseError as exc:
                item.report_failure(exc)
                continue
            except AssertionError:
                # Django's test cases forbid aliases a test did not declare in `databases`
                # (DatabaseOperationForbidden is an AssertionError): read from the primary
                # there, without holding it against the replica.
                continue
        connection._django_scale_epoch = (id(connection.connection), item.failures)  # type: ignore[attr-defined]
        return alias
    return None


def error_sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a database error: the driver's, which Django chains as the cause.

    psycopg 3 calls it ``sqlstate``, psycopg2 ``pgcode``. An error raised by the driver
    itself, unwrapped, is looked at directly.
    """
    for error in (exc.__cause__, exc):
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if code:
            return str(code)
    return None


#: SQLSTATE of a query cancelled by a recovery conflict on a hot standby.
RECOVERY_CONFLICT = "40001"
#: SQLSTATEs of a server that is going away (class 57 "operator intervention", but not
#: 57014, a query cancelled by statement_timeout or pg_cancel_backend()), and of failures
#: to connect (class 08).
_SERVER_GONE = ("57P", "08")


def _is_broken(connection: Any, sqlstate: str | None) -> bool:
    """Whether a failed query means the replica or the connection to it failed."""
    if sqlstate is None:
        # No answer from the server at all: the socket broke or the driver gave up.
        return True
    if sqlstate.startswith(_SERVER_GONE):
        return True
    raw = connection.connection
    return raw is None or bool(getattr(raw, "closed", False)) or bool(getattr(raw, "broken", False))


class ReplicaGuard:
    """An ``execute_wrapper`` for a replica connection: deadline, and retry on the primary.

    While a query runs on the replica, :data:`watchdog` shuts its socket down if the replica's
    monitor finds the replica unresponsive (a frozen host ignores server-side timeouts). A
    read that fails because the connection broke, or because the standby cancelled it for a
    recovery conflict (SQLSTATE 40001), runs again on the primary when it is not part of a
    transaction; the caller gets its rows as if nothing happened.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        connection = context["connection"]
        if connection.alias != self.alias:
            # In tests the replica alias may share the primary's connection object.
            return execute(sql, params, many, context)
        ticket = watchdog.watch(self.alias, connection)
        try:
            return execute(sql, params, many, context)
        except (OperationalError, InterfaceError, InternalError) as exc:
            sqlstate = error_sqlstate(exc)
            conflict = sqlstate == RECOVERY_CONFLICT
            broken = not conflict and _is_broken(connection, sqlstate)
            if broken:
                monitor(self.alias).report_failure(exc)
            if not (conflict or broken) or connection.in_atomic_block or not _is_read(sql):
                # The replica answered with an error of the query's own (a statement timeout,
                # say): that is the caller's to handle, and no reason to distrust the replica.
                raise
            if broken:
                # Close the broken connection so that the next read opens a new one.
                with contextlib.suppress(Exception):
                    connection.close()
            logger.warning(
                "a read on replica %r failed (%s); retrying it on the primary", self.alias, str(exc).strip()
            )
            result = _retry_on_primary(sql, params, many, context)
            _recount(self.alias, conf.PRIMARY)
            return result
        finally:
            watchdog.unwatch(ticket)


def _recount(routed_to: str, served_by: str) -> None:
    """Move one read from the alias the router chose to the alias that served it."""
    for counter in (state.reads if (state := _state.get()) else None, _capture.get()):
        if counter is not None and counter[routed_to] > 0:
            counter[routed_to] -= 1
            counter[served_by] += 1
            if not counter[routed_to]:
                del counter[routed_to]


def _is_read(sql: str) -> bool:
    return sql.lstrip().lstrip("(").upper().startswith(("SELECT", "WITH", "EXPLAIN", "SHOW", "VALUES"))


def _retry_on_primary(sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    primary = connections[conf.PRIMARY]
    primary.ensure_connection()
    with primary.wrap_database_errors:
        retry = primary.create_cursor()
        result = retry.executemany(sql, params) if many else retry.execute(sql, params)
    # Django's CursorWrapper reads its rows from .cursor: hand it the primary's cursor, so the
    # caller fetches the retried result. The broken replica cursor is closed quietly.
    wrapper = context["cursor"]
    broken, wrapper.cursor = wrapper.cursor, retry
    with contextlib.suppress(Exception):
        broken.close()
    return result


class Watchdog:
    """One daemon thread per process that cuts off queries stuck on an unresponsive replica."""

    #: How often the thread looks at the queries in flight, in seconds.
    tick = 0.05

    def __init__(self) -> None:
        self._inflight: dict[int, tuple[str, Any]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._has_work = threading.Event()
        self._thread: threading.Thread | None = None
        #: How many queries it has cut off (for tests and metrics).
        self.cut_off = 0

    def watch(self, alias: str, connection: Any) -> int:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="django-scale-watchdog", daemon=True)
                self._thread.start()
            self._next += 1
            self._inflight[self._next] = (alias, connection)
            self._has_work.set()
            return self._next

    def unwatch(self, ticket: int) -> None:
        with self._lock:
            self._inflight.pop(ticket, None)
            if not self._inflight:
                self._has_work.clear()

    def _run(self) -> None:
        while True:
            self._has_work.wait()
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                stuck = [
                    (ticket, connection)
                    for ticket, (alias, connection) in self._inflight.items()
                    if monitor(alias).is_unresponsive(now)
                ]
                for ticket, _ in stuck:
                    self._inflight.pop(ticket, None)
            for _, connection in stuck:
                self._cut_off(connection)

    def _cut_off(self, connection: Any) -> None:
        raw = connection.connection
        if raw is None:
            return
        try:
            fd = raw.fileno()
        except Exception:
            # Closed meanwhile (the guard closes a broken connection): psycopg2 raises
            # InterfaceError here, which must not end the watchdog's thread.
            return
        try:
            # shutdown() on a duplicate reaches the shared socket: the blocked recv() in the
            # query's thread returns, and the driver raises "server closed the connection".
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        self.cut_off += 1


#: The process's :class:`Watchdog`.
watchdog = Watchdog()


def _forget_after_fork() -> None:
    # A forked worker (gunicorn, Celery's prefork pool) inherits the monitors, the watchdog and
    # the shared-health threads' state but not the threads or locks: start afresh in the child.
    global _monitors_lock, watchdog
    _monitors.clear()
    _sharing.clear()
    _monitors_lock = threading.Lock()
    watchdog = Watchdog()


os.register_at_fork(after_in_child=_forget_after_fork)


def stop_monitors() -> None:
    """Stop this process's replica monitors; new ones start on the next routing decision."""
    with _monitors_lock:
        stopping = list(_monitors.values())
        _monitors.clear()
    for item in stopping:
        item.stop()
