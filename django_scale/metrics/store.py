"""Shared memory per worker *slot*: one fixed-size file per host that every process maps.

The file (``METRICS_DIR``) holds a header, the series' names (a series has the same number in
every slot) and ``METRICS_SLOTS`` slots. A process claims a free slot when it first records,
with an exclusive ``fcntl`` lock on the slot's byte that the kernel releases when the process
dies, however it dies. A new worker (recycling, a crash, a deploy) takes a free slot and *adds
to* its counts, so a host's totals never go down or rewind and the file never grows
(prometheus_client's multiprocess mode writes one file per pid: client_python #204, #443).
Only the slot's owner writes it; readers (the export) read every slot without locks.

A slot holds, per timing series, its exact count and sum, its running bucket counts
(:mod:`~django_scale.metrics.sketch` buckets, in 64-bucket chunks from the slot's pool) and a
ring of 16 per-minute *checkpoints*: the running counts when the series' first value of that
minute came. A window (1, 5 or 15 minutes) is the running counts less the checkpoint of its
first minute with values (file format v3: a checkpoint's rows of every chunk lie together). A
series' minutes never go back in a slot: a value stamped before its latest minute counts in
that minute. Running counts wrap at 2**31, differences are taken modulo 2**31. A fresh file is
sparse: pages nobody touched take neither disk nor memory.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections.abc import Iterable
from operator import methodcaller
from pathlib import Path
from typing import Any

from django_scale.exceptions import UsageError
from django_scale.metrics.host import HostSnapshot
from django_scale.metrics.layout import CHUNK_BYTES as _CHUNK_BYTES
from django_scale.metrics.layout import CHUNK_MASK as _CHUNK_MASK
from django_scale.metrics.layout import CHUNK_SHIFT as _CHUNK_SHIFT
from django_scale.metrics.layout import DIRECTORY as _DIRECTORY
from django_scale.metrics.layout import HEADER_BYTES as _HEADER_BYTES
from django_scale.metrics.layout import LATEST as _LATEST
from django_scale.metrics.layout import LOCK_BASE as _LOCK_BASE
from django_scale.metrics.layout import MAGIC as _MAGIC
from django_scale.metrics.layout import NAME_BYTES as _NAME_BYTES
from django_scale.metrics.layout import NAMES_LOCK as _NAMES_LOCK
from django_scale.metrics.layout import OVERFLOW as _OVERFLOW
from django_scale.metrics.layout import RING as _RING
from django_scale.metrics.layout import SLOT_HEADER as _SLOT_HEADER
from django_scale.metrics.layout import STAMPS as _STAMPS
from django_scale.metrics.layout import TIMING_BYTES as _TIMING_BYTES
from django_scale.metrics.layout import WINDOWS
from django_scale.metrics.reading import SlotReading
from django_scale.metrics.sketch import Sketch
from django_scale.metrics.windows import CHUNK_BUCKETS as _CHUNK_BUCKETS
from django_scale.metrics.windows import CHUNKS as _CHUNKS
from django_scale.metrics.windows import ROW_BYTES as _ROW_BYTES

try:
    import fcntl
except ImportError:  # Windows: no POSIX record locks, so no shared store (the counters still work)
    fcntl = None  # type: ignore[assignment]

__all__ = ["HostSnapshot", "SlotStore", "WINDOWS"]

_strip_nul = methodcaller("rstrip", b"\0")


def _page(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def _forget(ref: weakref.ref[SlotStore]) -> None:
    store = ref()
    if store is not None:
        store.forget_after_fork()


class SlotStore(SlotReading):
    """One host's metrics file, mapped into this process; see the module's docstring."""

    #: Seconds between two attempts to claim a slot when all were held.
    retry_after = 1.0
    #: Values this process could not record for want of a free slot.
    unrecorded = 0

    def __init__(self, directory: str | os.PathLike[str], slots: int, series: int, memory_mb: int) -> None:
        if fcntl is None:
            raise UsageError("Request metrics need POSIX file locks (fcntl): they do not run on Windows.")
        self.slots = slots
        self.timings = series
        self.counters = series * 4
        self.pool_chunks = max(1, memory_mb * 1024 * 1024 // _CHUNK_BYTES)
        self._names_offset = _HEADER_BYTES
        self._slots_offset = _page(_HEADER_BYTES + (self.timings + self.counters) * _NAME_BYTES)
        self._timings_offset = _SLOT_HEADER
        self._counters_offset = self._timings_offset + self.timings * _TIMING_BYTES
        self._pool_offset = _page(self._counters_offset + self.counters * 8)
        # A checkpoint's rows of every pool chunk lie together, in pool order (an export reads
        # them in one go, from few pages); then the running counts, one row per pool chunk.
        self._entry_bytes = self.pool_chunks * _ROW_BYTES
        self._running_offset = self._pool_offset + self.pool_chunks * _CHUNK_BYTES
        self.slot_bytes = _page(self._running_offset + self.pool_chunks * _ROW_BYTES)
        self.size = self._slots_offset + slots * self.slot_bytes
        name = f"django-scale-metrics-v3-{slots}x{series}x{memory_mb}.bin"
        self.path = Path(directory) / name
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lock_names()
        try:
            if os.fstat(self._fd).st_size < self.size:
                os.ftruncate(self._fd, self.size)
            self._map = mmap.mmap(self._fd, self.size)
            # No readahead: most of the file is holes, and on ext4 a read fault on one read
            # ahead large folios the kernel filled with zeros (a first export spent 15 to 140 ms
            # of system time there, perf: zero_user_segments under filemap_fault).
            if hasattr(mmap, "MADV_RANDOM"):
                self._map.madvise(mmap.MADV_RANDOM)
            if self._map[:8] != _MAGIC:
                self._map[:8] = _MAGIC
        finally:
            self._unlock_names()
        view = self._view = memoryview(self._map)
        self._u32 = view.cast("I")
        # Running counts are written through a signed view: past 2**31 - 1 it raises (see record).
        self._i32 = view.cast("i")
        self._u64 = view.cast("Q")
        self._f64 = view.cast("d")
        self._lock = threading.Lock()
        self._slot: int | None = None
        self._pid = 0
        self._failed_at = -1e9
        # The minute record() last stamped a value with: (its first second, the next's, minute).
        self._minute = (0.0, 0.0, 0)
        self._timing_ids: dict[str, int] = {}
        self._counter_ids: dict[str, int] = {}
        # This process's slot's words per series name (_timing_handle), per counter; emptied on a new slot.
        self._handles: dict[str, list[Any]] = {}
        self._counter_at: dict[str, int] = {}
        self._names: dict[bool, list[str]] = {True: [], False: []}
        # A forked child holds none of its parent's POSIX locks: it must claim a slot of its own.
        # (Checking os.getpid() on each record instead costs a system call per request.)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget(ref))

    # -- files and locks -------------------------------------------------------------------

    def _lock_names(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, _NAMES_LOCK, os.SEEK_SET)

    def _unlock_names(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _NAMES_LOCK, os.SEEK_SET)

    def _claim(self) -> int | None:
        """Claim a free slot for this process (the lowest); ``None`` when all are held."""
        for slot in range(self.slots):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_BASE + slot, os.SEEK_SET)
            except OSError:
                continue
            base = (self._slots_offset + slot * self.slot_bytes) // 4
            self._u32[base] = os.getpid() & 0xFFFFFFFF
            self._u32[base + 1] += 1  # how many processes held it
            self._handles = {}
            self._counter_at = {}
            return slot
        return None

    def forget_after_fork(self) -> None:
        """Drop the slot in a forked child: POSIX locks are not inherited, so it claims its own."""
        self._slot = None
        self._pid = 0
        self._lock = threading.Lock()
        self._handles = {}
        self._counter_at = {}

    def release(self) -> None:
        """Give this process's slot back (its counts stay: the next holder adds to them)."""
        with self._lock:
            if self._slot is not None and self._pid == os.getpid():
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LOCK_BASE + self._slot, os.SEEK_SET)
            self._slot = None
            self._pid = 0

    def slot(self) -> int | None:
        """Return this process's slot, claiming one the first time (``None``: all are held).

        Without a free slot, it tries again at most every :attr:`retry_after` seconds.
        """
        if self._pid != os.getpid() or (
            self._slot is None and time.monotonic() >= self._failed_at + self.retry_after
        ):
            self._slot = self._claim()
            self._pid = os.getpid()
            if self._slot is None:
                self._failed_at = time.monotonic()
        return self._slot

    # -- series names ------------------------------------------------------------------------

    def _count_offset(self, timing: bool) -> int:
        return 16 if timing else 17  # u32 index in the header: how many names are in use

    def _name_offset(self, timing: bool, index: int) -> int:
        first = 0 if timing else self.timings
        return self._names_offset + (first + index) * _NAME_BYTES

    def names(self, timing: bool) -> list[str]:
        """Return the names of the timing (or counter) series, by number (no :attr:`before_read`)."""
        known = self._names[timing]
        used = self._u32[self._count_offset(timing)]
        if used > len(known):  # the new names in one read, split, stripped and decoded in C
            data = self._map[self._name_offset(timing, len(known)) : self._name_offset(timing, used)]
            ends = range(_NAME_BYTES, len(data) + 1, _NAME_BYTES)
            rows = map(data.__getitem__, map(slice, range(0, len(data), _NAME_BYTES), ends))
            known.extend(map(bytes.decode, map(_strip_nul, rows)))
        return known

    def series(self, name: str, *, timing: bool) -> int:
        """Return the number of series *name*, adding it (the overflow series when full)."""
        ids = self._timing_ids if timing else self._counter_ids
        try:
            return ids[name]
        except KeyError:
            pass
        encoded = name.encode()[:_NAME_BYTES]
        while len(encoded) and encoded.decode(errors="ignore").encode() != encoded:
            encoded = encoded[:-1]
        self._lock_names()
        try:
            names = self.names(timing)
            if not names:  # series 0 of each kind is where names past the limit go
                self._write_name(timing, 0, _OVERFLOW.encode())
                names = self.names(timing)
            decoded = encoded.decode()
            if decoded in names:
                index = names.index(decoded)
            elif len(names) < (self.timings if timing else self.counters):
                index = len(names)
                self._write_name(timing, index, encoded)
            else:
                index = 0
        finally:
            self._unlock_names()
        ids[name] = index
        return index

    def _write_name(self, timing: bool, index: int, encoded: bytes) -> None:
        start = self._name_offset(timing, index)
        self._map[start : start + _NAME_BYTES] = encoded.ljust(_NAME_BYTES, b"\0")
        # The name is written before the count that makes readers look at it.
        self._u32[self._count_offset(timing)] = index + 1

    # -- writing (the owner of a slot only) ----------------------------------------------------

    def record(
        self,
        timings: Iterable[tuple[str, int, float]],
        counters: Iterable[tuple[str, int]],
        now: float | None = None,
    ) -> bool:
        """Add values ``(name, bucket, seconds)`` and counter increments ``(name, amount)``.

        Return ``False`` when no slot is free (nothing is recorded; :attr:`unrecorded` counts it).
        """
        return self.add(
            [(name, Sketch({bucket: 1}, 1, seconds)) for name, bucket, seconds in timings],
            counters,
            now,
        )

    def add(
        self,
        timings: Iterable[tuple[str, Sketch]],
        counters: Iterable[tuple[str, int]],
        now: float | None = None,
    ) -> bool:
        """Add the values of a sketch to each timing series ``(name, sketch)``, and counter
        increments ``(name, amount)``, all at *now*.

        A batch of requests written this way costs one series' writes per series and one
        addition per bucket, not per value (:mod:`~django_scale.metrics.pending`). Return
        ``False`` when no slot is free.
        """
        now = time.time() if now is None else now
        # The minute of *now*, kept with its bounds: two comparisons cost less than a division.
        start, end, minute = self._minute
        if not start <= now < end:
            minute = int(now // 60)
            self._minute = (minute * 60.0, minute * 60.0 + 60.0, minute)
        # acquire()/release(), not "with": a third of the cost of a call without values.
        lock = self._lock
        lock.acquire()
        try:
            if self._slot is None and self.slot() is None:
                self.unrecorded += 1
                return False
            if timings:
                # A series' writes, written out here: a method call per series costs as much as they do.
                handles = self._handles
                u64, f64, i32 = self._u64, self._f64, self._i32
                for name, sketch in timings:
                    handle = handles.get(name) or self._timing_handle(name)
                    count = handle[0]
                    u64[count] += sketch.count
                    f64[count + 1] += sketch.total
                    if minute > handle[4]:  # (an earlier minute counts in the latest)
                        self._checkpoint(handle, minute)
                    rows = handle[8]
                    for bucket, amount in sketch.buckets.items():
                        chunk = bucket >> _CHUNK_SHIFT
                        row = rows[chunk] or self._allocate(handle, chunk, amount)
                        if row:
                            at = row + (bucket & _CHUNK_MASK)
                            # Past 2**31 - 1 the count wraps (differences are taken modulo 2**31).
                            try:
                                i32[at] += amount
                            except ValueError:
                                i32[at] = (i32[at] + amount) & 0x7FFFFFFF
            if counters:
                u64 = self._u64
                at_ = self._counter_at
                for name, amount in counters:
                    u64[at_.get(name) or self._counter_index(name)] += amount  # (0 is never a counter's)
        finally:
            lock.release()
        return True

    def _slot_base(self) -> int:
        assert self._slot is not None
        return self._slots_offset + self._slot * self.slot_bytes

    def _timing_handle(self, name: str) -> list[Any]:
        """Return the words of timing *name* in this process's slot, kept for its next values.

        ``[count (u64 index; its sum is the next f64), first ring stamp, first directory entry,
        latest minute + 1 (u32 indexes), the latest minute, the running row of pool chunk 0, checkpoint
        0's row of pool chunk 0 (u32 indexes), u32 words between two checkpoints' rows, per chunk
        its running row (i32 index, 0: none yet; the directory as the owner wrote it, not read)]``.
        """
        base = self._slot_base()
        timing = base + self._timings_offset + self.series(name, timing=True) * _TIMING_BYTES
        latest = (timing + _LATEST) >> 2
        directory, running = (timing + _DIRECTORY) >> 2, ((base + self._running_offset) >> 2) - _CHUNK_BUCKETS
        rows = [running + p * _CHUNK_BUCKETS if p else 0 for p in self._u32[directory : directory + _CHUNKS]]
        handle: list[Any] = [
            timing >> 3,
            (timing + _STAMPS) >> 2,
            directory,
            latest,
            self._u32[latest] - 1,
            running,
            ((base + self._pool_offset) >> 2) - _CHUNK_BUCKETS,
            self._entry_bytes >> 2,
            rows,
        ]
        self._handles[name] = handle
        return handle

    def _counter_index(self, name: str) -> int:
        index = self._counter_at[name] = ((self._slot_base() + self._counters_offset) >> 3) + self.series(
            name, timing=False
        )
        return index

    def _checkpoint(self, handle: list[Any], minute: int) -> None:
        """The series' first value of *minute*, after its latest: checkpoint its running counts."""
        _, stamps, directory, latest, _, running, checkpoints, entry_words, _ = handle
        u32 = self._u32
        entry = minute % _RING
        rows = checkpoints + entry * entry_words
        for pool in u32[directory : directory + _CHUNKS].tolist():
            if pool:
                row = rows + pool * _CHUNK_BUCKETS
                source = running + pool * _CHUNK_BUCKETS
                u32[row : row + _CHUNK_BUCKETS] = u32[source : source + _CHUNK_BUCKETS]
        # The rows before the stamp that makes readers use them.
        u32[stamps + entry] = u32[latest] = minute + 1
        handle[4] = minute

    def _allocate(self, handle: list[Any], chunk: int, values: int) -> int:
        """Give a series' *chunk* a place in the slot's pool: its running row; 0 when full (its *values* counted)."""
        u32 = self._u32
        header = self._slot_base() >> 2
        if u32[header + 2] >= self.pool_chunks:
            u32[header + 3] += values
            return 0
        u32[header + 2] += 1
        pool = u32[handle[2] + chunk] = u32[header + 2]
        row = handle[8][chunk] = int(handle[5]) + pool * _CHUNK_BUCKETS
        return row

    def live_slots(self) -> list[int]:
        """Return the slots a live process holds now (its lock is taken)."""
        live = []
        mine = self._slot if self._pid == os.getpid() else None
        for slot in range(self.slots):
            if slot == mine:
                live.append(slot)
                continue
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_BASE + slot, os.SEEK_SET)
            except OSError:
                live.append(slot)
            else:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LOCK_BASE + slot, os.SEEK_SET)
        return live

    def file_usage(self) -> tuple[int, int]:
        """Return the file's apparent size and the bytes it really takes (its blocks)."""
        stat = os.fstat(self._fd)
        return stat.st_size, stat.st_blocks * 512
