"""The sniper's recent kills, shared by every process of a host: a small ring file.

The query sniper (:mod:`django_scale.sniper`) runs in one process at a time, on any host; the
status page, ``scale_status`` and ``/scale/sketches.json`` may run anywhere else. Each kill is
written, as a short JSON record, into a fixed-size ring of :data:`KEEP` records in
``METRICS_DIR`` next to the metrics file: the newest overwrite the oldest, so the file never
grows. Writers take an ``fcntl`` lock (the kernel drops it if the process dies), readers a
shared one. Across hosts the list travels in each host's metrics document and merges with
it (:func:`merge_kills`), as the sketches do.

Recorded only in processes where shared metrics are on (:func:`django_scale.metrics.enable`,
which ``MetricsMiddleware`` runs and ``scale_snipe`` runs when the middleware is installed),
like the ``sniper.*`` counters.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from django_scale.conf import conf
from django_scale.metrics import counters

try:
    import fcntl
except ImportError:  # Windows: no shared metrics (see store.py)
    fcntl = None  # type: ignore[assignment]
#: Whether this platform has POSIX record locks, which the shared log needs.
_LOCKS: bool = fcntl is not None

__all__ = ["KEEP", "KillLog", "kill_log", "merge_kills", "record_kill", "recent_kills"]

logger = logging.getLogger("django_scale.metrics")

#: How many kills a host keeps, and a merged list shows.
KEEP = 50

_MAGIC = b"DJSKILL1"
_HEADER = 64  # magic, then the number of kills ever written (u64)
_RECORD = 1024  # a length (u32) and that many bytes of JSON
_LENGTH = struct.Struct("=I")
_SEQUENCE = struct.Struct("=Q")
#: The fields of a kill: when (``time.time()``), the host of the sniper, the alias it watched,
#: the backend's pid, ``cancel`` or ``terminate``, whether it was a dry run and the signal was
#: sent, the rule, the backend's state and seconds in it, its application, and its query's
#: fingerprint (literals stripped) with the fingerprint's short hash.
FIELDS = (
    "at",
    "host",
    "alias",
    "pid",
    "action",
    "dry_run",
    "signalled",
    "rule",
    "state",
    "duration",
    "application_name",
    "fingerprint_id",
    "fingerprint",
)


class KillLog:
    """The ring file of one host's recent kills (see the module's docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / "django-scale-kills-v1.bin"
        self.size = _HEADER + KEEP * _RECORD
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._thread_lock = threading.Lock()
        with self._locked(fcntl.LOCK_EX):
            if os.fstat(self._fd).st_size < self.size:
                os.ftruncate(self._fd, self.size)
            self._map = mmap.mmap(self._fd, self.size)
            if self._map[:8] != _MAGIC:
                self._map[:8] = _MAGIC
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # Another thread of the parent may have held it when the process forked.
        self._thread_lock = threading.Lock()

    def _locked(self, kind: int) -> _FileLock:
        return _FileLock(self._fd, kind)

    def add(self, entry: Mapping[str, Any]) -> None:
        """Write *entry* (JSON-able) as the newest kill; a long fingerprint is shortened to fit."""
        data = _encode(entry)
        with self._thread_lock, self._locked(fcntl.LOCK_EX):
            (written,) = _SEQUENCE.unpack_from(self._map, 8)
            at = _HEADER + (written % KEEP) * _RECORD
            self._map[at : at + _LENGTH.size + len(data)] = _LENGTH.pack(len(data)) + data
            # The record first, then the count that makes readers look at it.
            _SEQUENCE.pack_into(self._map, 8, written + 1)

    def recent(self) -> list[dict[str, Any]]:
        """Return the kills kept, newest first."""
        raw = []
        with self._thread_lock, self._locked(fcntl.LOCK_SH):
            (written,) = _SEQUENCE.unpack_from(self._map, 8)
            for index in range(written - 1, max(written - KEEP, 0) - 1, -1):
                at = _HEADER + (index % KEEP) * _RECORD
                (length,) = _LENGTH.unpack_from(self._map, at)
                length = min(length, _RECORD - _LENGTH.size)
                raw.append(bytes(self._map[at + _LENGTH.size : at + _LENGTH.size + length]))
        found = []
        for data in raw:
            try:
                entry = json.loads(data)
            except ValueError:
                continue  # a record of another version, or a torn one: skip it
            if isinstance(entry, dict):
                found.append(entry)
        return found


class _FileLock:
    """An ``fcntl`` lock on the whole file for a ``with`` block."""

    def __init__(self, fd: int, kind: int) -> None:
        self.fd, self.kind = fd, kind

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, self.kind, 0, 0, os.SEEK_SET)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 0, 0, os.SEEK_SET)


def _encode(entry: Mapping[str, Any]) -> bytes:
    data = json.dumps(dict(entry), separators=(",", ":")).encode()
    room = _RECORD - _LENGTH.size
    if len(data) <= room:
        return data
    # Shorten the fingerprint (the only long field) until the record fits.
    shortened = dict(entry)
    text = str(shortened.get("fingerprint", ""))
    while len(data) > room and text:
        text = text[: max(0, len(text) - (len(data) - room) - 1)]
        shortened["fingerprint"] = text + "…"
        data = json.dumps(shortened, separators=(",", ":")).encode()
    return data[:room] if len(data) > room else data


_logs: dict[str, KillLog] = {}
_logs_lock = threading.Lock()


def kill_log() -> KillLog:
    """Return this host's kill log for the current ``METRICS_DIR`` (one mapping per process)."""
    directory = str(conf.metrics_options()[0])
    found = _logs.get(directory)
    if found is None:
        with _logs_lock:
            found = _logs.get(directory)
            if found is None:
                found = _logs[directory] = KillLog(directory)
    return found


def record_kill(entry: Mapping[str, Any]) -> None:
    """Add one kill to the host's log, if shared metrics are on in this process.

    *entry* holds :data:`FIELDS` but ``host``, which is added. A failure is logged, never raised:
    the sniper must go on.
    """
    if not counters._shared_sink or not _LOCKS:
        return
    try:
        kill_log().add({"host": socket.gethostname(), **entry})
    except OSError:
        logger.exception("could not write the sniper's kill to the metrics directory")


def recent_kills() -> list[dict[str, Any]]:
    """Return this host's recent kills, newest first (none when the directory cannot be read)."""
    if not _LOCKS:
        return []
    try:
        return kill_log().recent()
    except OSError:
        logger.exception("could not read the sniper's kills from the metrics directory")
        return []


def merge_kills(lists: Iterable[Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Return the kills of several hosts as one list, newest first, the same kill once, at most :data:`KEEP`."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for kills in lists:
        for kill in kills:
            key = (kill.get("host"), kill.get("alias"), kill.get("pid"), kill.get("at"), kill.get("action"))
            seen.setdefault(key, dict(kill))
    return sorted(seen.values(), key=lambda kill: float(kill.get("at") or 0.0), reverse=True)[:KEEP]
