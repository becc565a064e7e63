"""The health of each replica as this process sees it: one monitor thread per replica.

:class:`ReplicaMonitor` probes its replica every ``HEALTH_CHECK_INTERVAL`` seconds, on a
connection of its own opened through the database backend, and records the replay position,
the lag and whether the replica answered. The request path only reads what the monitors
recorded: a routing decision does no I/O, and a frozen replica cannot hold a request for
longer than ``REPLICA_DEADLINE``. What other processes learnt comes through
:class:`~django_scale.replicas.health.SharedHealth`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from django_scale.conf import HotSettings, conf
from django_scale.replicas.health import shared_health
from django_scale.replicas.hostshare import HostRecord, HostShare, forget_shares, host_share
from django_scale.replicas.wal import parse_lsn

__all__ = ["ReplicaMonitor", "monitor", "stop_monitors", "wait_for_replicas"]

logger = logging.getLogger("django_scale.replicas")

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

#: Seconds by which two processes' monotonic clocks may differ and still count as one.
_SAME_CLOCK = 1.0

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
        #: This process's last probe of a streaming standby: its replay position, the
        #: server's identity (start time and port) and when (``time.monotonic()``) the probe
        #: was sent, set together; ``None`` before the first. Replay only moves forward within
        #: one run of a server, so the position is a lower bound of what any later read on that
        #: run sees (the query cache's read positions).
        self.probed: tuple[int, str, float] | None = None
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
        #: Whether ``_first`` is set (a plain attribute: Event.is_set() is a call per read).
        self._probed = False
        self._connection: BaseDatabaseWrapper | None = None
        self._vendor = connections[alias].vendor
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._logged: str = ""
        self._stopped = False
        self._primary_id: str | None = None
        #: How many times this process copied the host's shared record instead of probing.
        self.shared_reads = 0
        self._share: HostShare | None = None
        self._share_looked_up = False
        self._shared_failures = 0

    # The request path: reads only, no I/O.

    def is_available(self, now: float | None = None, required_lsn: int | None = None) -> bool:
        """Whether this replica may take a read now (and has replayed *required_lsn*)."""
        return self.availability(time.monotonic() if now is None else now, required_lsn)[0]

    def availability(
        self, now: float, required_lsn: int | None = None, hot: HotSettings | None = None
    ) -> tuple[bool, float]:
        """Return whether the replica may take a read, and until when that holds at the latest.

        The answer stays true until the returned time unless :attr:`version` changes first.
        *hot* is ``conf.hot()``, when the caller has it.
        """
        if self._vendor != "postgresql":
            # Nothing to probe: a replica of another database is trusted as configured.
            return required_lsn is None, math.inf
        if hot is None:
            hot = conf.hot()
        deadline = hot.deadline
        if not self._probed:
            if self._thread is None:
                self._ensure_started()
            # The first use in this process waits for one probe, within the deadline.
            self._first.wait(deadline)
        busy_since = self._busy_since
        if now < self.down_until or (busy_since is not None and now - busy_since > deadline):
            return False, now  # unresponsive (is_unresponsive(), inlined for the hot path)
        # Without a fresh probe the replica may have frozen: trust the last one for so long.
        fresh_until = self.checked_at + hot.interval + deadline
        if not self.checked_at or now > fresh_until:
            return False, now
        lag = self.lag
        if lag is None or lag > hot.max_lag:
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
            share = self._host_share()
            if share is not None and not self._waiters and not share.try_lead() and self._follow(share):
                # Another process of this host probed: its record is copied, no probe here.
                # Looked at twice per interval, so a record is never an interval late.
                self._first.set()
                self._wake.wait(conf.HEALTH_CHECK_INTERVAL / 2)
                self._wake.clear()
                continue
            self.probe()
            if share is not None and share.leading:
                share.publish(self._shared_record())
            self._first.set()
            self._probed = True
            if self._waiters:
                # A request waits for this replica to replay its user's write: look again soon
                # (probing here, whoever the host's prober is).
                time.sleep(0.001)
                continue
            self._wake.wait(conf.HEALTH_CHECK_INTERVAL)
            self._wake.clear()

    # Sharing the probes between the processes of a host (SHARED_HEALTH).

    def _host_share(self) -> HostShare | None:
        if not self._share_looked_up:
            self._share = host_share(self.alias, connections[self.alias].settings_dict)
            self._share_looked_up = True
        return self._share

    def _shared_record(self) -> HostRecord:
        """What this process (the host's prober) measured, for the other processes."""
        wall, mono = time.time(), time.monotonic()
        return HostRecord(
            pid=os.getpid(),
            published=wall,
            checked=wall - (mono - self.checked_at) if self.checked_at else 0.0,
            replay_lsn=self.replay_lsn,
            lag=self.lag,
            down_until=wall + (self.down_until - mono) if self.down_until > mono else 0.0,
            failures=self.failures,
            error=self.error,
            probed=self.probed,
            clock=wall - mono,
        )

    def _follow(self, share: HostShare) -> bool:
        """Copy the host prober's record into this monitor; return ``False`` if it is stale."""
        record = share.read()
        wall, mono = time.time(), time.monotonic()
        deadline, interval, _ = conf.health_limits()
        if record is None or wall - record.published > interval + deadline:
            return False
        offset = mono - wall
        self.replay_lsn = max(self.replay_lsn, record.replay_lsn)
        self.lag = record.lag
        self.checked_at = record.checked + offset if record.checked else 0.0
        self.error = record.error
        self._follow_probe(record, wall - mono)
        if record.failures != self._shared_failures:
            # The replica failed since the last record: connections opened before are suspect.
            self._shared_failures = record.failures
            self.failures += 1
        shared_until = record.down_until + offset if record.down_until > wall else 0.0
        until = max(self._ejected_until, shared_until)
        self.down_until = until if until > mono else 0.0
        # A connection of this process's own, from a probe while the record was stale, is one
        # more probe connection per worker: close it.
        self._close()
        self.shared_reads += 1
        self.version += 1
        with _progress:
            _progress.notify_all()
        return True

    def _follow_probe(self, record: HostRecord, clock: float) -> None:
        """Take the prober's last standby probe as this process's :attr:`probed` (the query
        cache's lower bound of a standby's replay position), when the send time compares.

        The send time is the prober's ``time.monotonic()``: the processes of one host share
        the clock unless one runs in another time namespace, which a different offset from
        the wall clock shows. The time is taken one second early: a lower bound, through
        wall-clock adjustments between the two offsets.
        """
        probed = record.probed
        if probed is None or abs(record.clock - clock) > _SAME_CLOCK:
            return
        sent = probed[2] - _SAME_CLOCK
        if self.probed is None or sent > self.probed[2]:
            self.probed = (probed[0], probed[1], sent)

    def _primary_identity(self) -> str | None:
        """Return the primary's identity (once per monitor), or ``None`` if it cannot be read."""
        if self._primary_id is None:
            try:
                wrapper = self._connect(conf.PRIMARY)
                try:
                    cursor = wrapper.connection.cursor()
                    cursor.execute(_IDENTITY_SQL)
                    self._primary_id = str(cursor.fetchone()[0])
                finally:
                    wrapper.close()
            except Exception:
                logger.warning("could not read the identity of the primary %r", conf.PRIMARY, exc_info=True)
                return None
        return self._primary_id

    def _connect(self, alias: str | None = None) -> BaseDatabaseWrapper:
        """Open a connection of the monitor's own to *alias* (by default its replica).

        It is a private instance of the alias's ``DatabaseWrapper``, never the one requests
        use in this thread, opened the way Django opens any connection: the backend's
        ``get_connection_params()``, ``get_new_connection()`` and ``init_connection_state()``
        run (custom backends, IAM tokens, poolers' settings). It never comes
        from a connection pool (``OPTIONS["pool"]``, Django 5.1+), which it would hold forever.
        """
        alias = alias or self.alias
        settings_dict = connections[alias].settings_dict
        options = {key: value for key, value in settings_dict.get("OPTIONS", {}).items() if key != "pool"}
        # libpq's connect_timeout counts whole seconds and ignores values below 2.
        options.setdefault("connect_timeout", max(2, math.ceil(conf.REPLICA_DEADLINE)))
        # The backend's own class, constructed as ConnectionHandler.create_connection() does,
        # on a copy of the settings so that the pool option is dropped for this instance only.
        wrapper: BaseDatabaseWrapper = type(connections[alias])({**settings_dict, "OPTIONS": options}, alias)
        # stop() closes it from another thread than the monitor's.
        wrapper.inc_thread_sharing()
        try:
            # What connect() does, but for connection_created: its receivers act on the alias's
            # connection of the current thread (django.contrib.postgres opens connections[alias]
            # to look up the hstore type), which would leave one open in the monitor's thread.
            with wrapper.wrap_database_errors:
                wrapper.connection = wrapper.get_new_connection(wrapper.get_connection_params())
                wrapper.set_autocommit(True)
                wrapper.init_connection_state()
        except BaseException:
            with contextlib.suppress(Exception):
                wrapper.close()
            raise
        return wrapper

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
        self._busy_since = sent = time.monotonic()
        try:
            if self._connection is None:
                self._connection = self._connect()
            # The DB-API cursor: a probe is no query of the application's, for its execute
            # wrappers or its query log (DEBUG) to see.
            cursor = self._connection.connection.cursor()
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
                self.probed = (measured[0], str(identity), sent)
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


#: Bumped whenever the monitor objects are replaced (and by ``routers.connections_changed()``
#: for connection objects): the router keeps both per thread, and looks them up again then.
route_generation = [0]


def stop_monitors() -> None:
    """Stop this process's replica monitors; new ones start on the next routing decision."""
    with _monitors_lock:
        stopping = list(_monitors.values())
        _monitors.clear()
        route_generation[0] += 1
    for item in stopping:
        item.stop()
    # Give up this process's lead of the host's probes, so that another process takes over
    # rather than every process falling back to probing on its own.
    forget_shares()


def _forget_after_fork() -> None:
    # A forked worker (gunicorn, Celery's prefork pool) inherits the monitors but not their
    # threads or locks: start afresh in the child.
    global _monitors_lock
    _monitors.clear()
    _monitors_lock = threading.Lock()
    # The forking thread's route (a threading.local survives in the child) holds the parent's
    # monitors, whose threads the child does not have.
    route_generation[0] += 1


os.register_at_fork(after_in_child=_forget_after_fork)
