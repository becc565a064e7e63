"""Replica health shared by the processes of one host: one prober per replica, a record in memory.

Every worker process has a :class:`~django_scale.replicas.monitors.ReplicaMonitor` per replica,
but with ``SHARED_HEALTH`` on, only one process per host and replica probes it: the one that
holds an exclusive ``flock()`` on the replica's lock file in ``SHARED_HEALTH_DIR``. It writes
each probe's result into the replica's record, a small memory-mapped file; every other
process's monitor thread copies the record into its monitor instead of probing. So the probe
connections and probes per interval per replica do not grow with the number of workers.

The kernel releases a ``flock()`` when its holder exits or dies, so another process takes over
at its next look. A holder that is alive but stuck (stopped, or its probe hung) stops
publishing: a record older than ``HEALTH_CHECK_INTERVAL + REPLICA_DEADLINE`` is stale, and
each process then probes on its own until a fresh record appears.

The record is written under a sequence lock (odd while being written), so a reader never takes
half of one write and half of another, and it never waits: a read is a few memory loads. The
routing decision itself reads only the monitor, as before; no I/O.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import mmap
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django_scale.conf import conf

__all__ = ["HostRecord", "HostShare", "host_share"]

logger = logging.getLogger("django_scale.replicas")

# seq, pid, published, checked, replay_lsn, lag (NaN: unknown), down_until, failures, error,
# then the last standby probe (replay position, monotonic send time, server identity; an empty
# identity: none) and the prober's clock offset.
_LAYOUT = struct.Struct("<Qqddqddq192sqd64sd")
#: Part of the files' names: a process of a version with another layout uses other files.
_LAYOUT_VERSION = 2
_SEQ = struct.Struct("<Q")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock(), so no sharing
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class HostRecord:
    """One probe's result as the host's prober published it (times are ``time.time()``)."""

    #: The prober's process id.
    pid: int
    #: When the prober wrote this record.
    published: float
    #: When the probe answered, or ``0.0`` if it failed.
    checked: float
    #: The replay position the replica reported.
    replay_lsn: int
    #: Lag in seconds, ``None`` when unknown.
    lag: float | None
    #: Until when the replica takes no reads (a failure, here or shared through the cache).
    down_until: float
    #: How many times the replica has failed, as the prober counted.
    failures: int
    #: The error of the last failed probe.
    error: str
    #: The prober's last probe of a streaming standby, as ``ReplicaMonitor.probed``: its replay
    #: position, the server's identity (start time and port) and when the probe was sent, in
    #: the prober's ``time.monotonic()``; ``None`` before the first.
    probed: tuple[int, str, float] | None = None
    #: The prober's ``time.time() - time.monotonic()`` when it wrote the record: a reader whose
    #: own differs runs on another monotonic clock, and must not compare the send time.
    clock: float = 0.0


class HostShare:
    """The lock and record files of one replica in ``SHARED_HEALTH_DIR``."""

    def __init__(self, directory: Path, key: str) -> None:
        self._lock_path = directory / f"{key}.v{_LAYOUT_VERSION}.lock"
        self._record_path = directory / f"{key}.v{_LAYOUT_VERSION}.health"
        self._lock_fd: int | None = None
        self._leading = False
        # Between the prober's writes and close(), which stop_monitors() may call from
        # another thread while the prober publishes.
        self._writing = threading.Lock()
        fd = os.open(self._record_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _LAYOUT.size:
                os.ftruncate(fd, _LAYOUT.size)
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)

    @property
    def leading(self) -> bool:
        """Whether this process is the host's prober of the replica."""
        return self._leading

    def try_lead(self) -> bool:
        """Become the host's prober if no live process is; return whether this process is."""
        if self._leading:
            return True
        if self._lock_fd is None or fcntl is None:
            return False
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            return False
        self._leading = True
        return True

    def publish(self, record: HostRecord) -> None:
        """Write *record* (only the prober does; nothing once :meth:`close` ran)."""
        with self._writing:
            if not self._leading or self._map.closed:
                return
            probed = record.probed or (0, "", 0.0)
            (seq,) = _SEQ.unpack_from(self._map, 0)
            seq = seq + 1 if seq % 2 == 0 else seq + 2  # odd (a writer that died left it odd)
            _SEQ.pack_into(self._map, 0, seq)  # odd: being written
            _LAYOUT.pack_into(
                self._map,
                0,
                seq,
                record.pid,
                record.published,
                record.checked,
                record.replay_lsn,
                math.nan if record.lag is None else record.lag,
                record.down_until,
                record.failures,
                record.error.encode("utf-8", "replace")[:192],
                probed[0],
                probed[2],
                probed[1].encode("utf-8", "replace")[:64],
                record.clock,
            )
            _SEQ.pack_into(self._map, 0, seq + 1)  # even: complete

    def read(self) -> HostRecord | None:
        """Return the published record, or ``None`` if there is none (no I/O: memory loads)."""
        for _ in range(4):
            try:
                values = _LAYOUT.unpack_from(self._map, 0)
                (after,) = _SEQ.unpack_from(self._map, 0)
            except ValueError:  # closed by stop_monitors() meanwhile
                return None
            seq = values[0]
            if seq % 2 or seq != after:
                continue  # a write is under way, or came in between: read again
            if seq == 0:
                return None
            _, pid, published, checked, replay_lsn, lag, down_until, failures, error, *probe = values
            probed_lsn, probed_sent, probed_server, clock = probe
            server = probed_server.rstrip(b"\0").decode("utf-8", "replace")
            return HostRecord(
                pid=pid,
                published=published,
                checked=checked,
                replay_lsn=replay_lsn,
                lag=None if math.isnan(lag) else lag,
                down_until=down_until,
                failures=failures,
                error=error.rstrip(b"\0").decode("utf-8", "replace"),
                probed=(probed_lsn, server, probed_sent) if server else None,
                clock=clock,
            )
        return None

    def close(self) -> None:
        """Give up the lead (if held) and close the files."""
        with self._writing:
            self._abandon()

    def _abandon(self) -> None:
        # Without the lock: a forked child calls this, where the lock may have been copied held.
        fd, self._lock_fd = self._lock_fd, None
        self._leading = False
        if fd is not None:
            os.close(fd)  # releases the flock() unless another process still shares it
        with contextlib.suppress(Exception):
            self._map.close()


def share_directory() -> Path:
    """Return ``SHARED_HEALTH_DIR``, or its default under the system's temporary directory."""
    configured = conf.SHARED_HEALTH_DIR
    if configured:
        return Path(configured)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"django-scale-{uid}"


def share_key(alias: str, settings_dict: dict[str, Any]) -> str:
    """Name a replica's files after what it connects to, so unrelated processes never share."""
    identity = {key: str(settings_dict.get(key) or "") for key in ("ENGINE", "HOST", "PORT", "NAME", "USER")}
    digest = hashlib.sha256(json.dumps([alias, identity], sort_keys=True).encode()).hexdigest()[:20]
    return f"{alias[:40]}-{digest}"


_shares: dict[str, HostShare | None] = {}
_shares_lock = threading.Lock()
_warned: set[str] = set()


def host_share(alias: str, settings_dict: dict[str, Any]) -> HostShare | None:
    """Return this process's :class:`HostShare` of replica *alias*, or ``None`` without sharing.

    ``None`` when ``SHARED_HEALTH`` is off, where there is no ``flock()``, or when the files
    cannot be made (logged once): the monitor then probes on its own.
    """
    if not conf.SHARED_HEALTH or fcntl is None:
        return None
    key = share_key(alias, settings_dict)
    with _shares_lock:
        if key not in _shares:
            directory = share_directory()
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                _shares[key] = HostShare(directory, key)
            except OSError as error:
                if str(directory) not in _warned:
                    _warned.add(str(directory))
                    logger.warning(
                        "replica health is not shared between processes: %s (SHARED_HEALTH_DIR); "
                        "each process probes the replicas itself",
                        error,
                    )
                _shares[key] = None
        return _shares[key]


def forget_shares() -> None:
    """Close this process's shares (tests, and a forked child, which must not inherit the lead)."""
    with _shares_lock:
        shares = list(_shares.values())
        _shares.clear()
    for share in shares:
        if share is not None:
            share.close()


def _after_fork() -> None:
    # A forked worker inherits the lock file's descriptor, and with it the parent's flock():
    # close the child's copy (the parent keeps the lead) and start afresh. No lock is taken:
    # one held by another thread at the fork stays held in the child forever.
    global _shares_lock
    _shares_lock = threading.Lock()
    shares = list(_shares.values())
    _shares.clear()
    for share in shares:
        if share is not None:
            share._abandon()


os.register_at_fork(after_in_child=_after_fork)
