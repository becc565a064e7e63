"""Reading the host's metrics file (any process): totals, counters and window sketches of every slot.

:class:`SlotReading` is the half of :class:`~django_scale.metrics.store.SlotStore` that
reads: :meth:`~SlotReading.snapshot` (what the export and ``scale_status`` show) and
:meth:`~SlotReading.history` (the status page's charts). It reads without locks: a slot's
owner writes each row before the stamp that makes readers use it.
"""

from __future__ import annotations

import mmap
import time
from array import array
from collections.abc import Callable, Iterable
from itertools import chain, compress
from operator import add
from typing import TYPE_CHECKING

from django_scale.metrics.host import HostSnapshot
from django_scale.metrics.layout import KEEP as _KEEP
from django_scale.metrics.layout import NEVER as _NEVER
from django_scale.metrics.layout import RING as _RING
from django_scale.metrics.layout import SKIP as _SKIP
from django_scale.metrics.layout import TIMING_BYTES as _TIMING_BYTES
from django_scale.metrics.layout import TIMING_HEADER as _TIMING_HEADER
from django_scale.metrics.layout import WINDOWS
from django_scale.metrics.sketch import DenseSketch, Sketch
from django_scale.metrics.windows import CHUNKS as _CHUNKS
from django_scale.metrics.windows import ROW_BYTES as _ROW_BYTES
from django_scale.metrics.windows import ZERO_ROW as _ZERO_ROW
from django_scale.metrics.windows import blocks as _blocks
from django_scale.metrics.windows import fields as _fields
from django_scale.metrics.windows import gather, split_rows
from django_scale.metrics.windows import layout as _layout
from django_scale.metrics.windows import plan as _plan
from django_scale.metrics.windows import rows_mask as _rows_mask
from django_scale.metrics.windows import sketches as _sketches
from django_scale.metrics.windows import window as _window

__all__ = ["SlotReading"]


class SlotReading:
    """The reads of a :class:`~django_scale.metrics.store.SlotStore` (its base class)."""

    slots: int
    slot_bytes: int
    _slots_offset: int
    _timings_offset: int
    _counters_offset: int
    _pool_offset: int
    _running_offset: int
    _entry_bytes: int
    _map: mmap.mmap
    _u32: memoryview[int]
    _u64: memoryview[int]
    _f64: memoryview[float]
    #: Called before :meth:`snapshot` and :meth:`history` read: get_store() sets it to metrics.flush.
    before_read: Callable[[], object] = staticmethod(lambda: None)

    if TYPE_CHECKING:  # what SlotStore, the class this is a base of, provides

        def names(self, timing: bool) -> list[str]: ...

        def live_slots(self) -> list[int]: ...

    def _rows(self, base: int, span: Iterable[int], entry: int | None) -> int:
        """Return one series' rows of checkpoint *entry* (``None``: its running counts) as one integer.

        *span* is the series' chunk directory from its first chunk to its last (0: a gap). The
        integer holds one 32-bit field per bucket, the first chunk's bucket 0 lowest.
        """
        map_ = self._map
        if entry is None:
            start, stride = base + self._running_offset - _ROW_BYTES, _ROW_BYTES
        else:
            start, stride = base + self._pool_offset - _ROW_BYTES + entry * self._entry_bytes, _ROW_BYTES
        rows = [
            map_[start + pool * stride : start + pool * stride + _ROW_BYTES] if pool else _ZERO_ROW
            for pool in span
        ]
        return int.from_bytes(b"".join(rows), "little")

    def snapshot(self, windows: Iterable[int] = WINDOWS, now: float | None = None) -> HostSnapshot:
        """Sum every slot: totals, counters and the sketches of *windows* (minutes)."""
        self.before_read()
        minute = int((time.time() if now is None else now) // 60)
        result = HostSnapshot(minute=minute)
        # Copies: another thread may add names meanwhile (names() appends to its list).
        timing_names = list(self.names(True))
        counter_names = list(self.names(False))
        n = len(timing_names)
        u32, u64, f64 = self._u32, self._u64, self._f64
        windows = tuple(sorted(windows))
        counts, seconds, counters = [0] * n, [0.0] * n, [0] * len(counter_names)
        # Per ring stamps: its number, and per window the checkpoint the window starts at (see
        # plan()); None: no values in the window; _NEVER: no value ever in the slot (zero rows).
        rings: dict[tuple[int, ...], int] = {(0,) * _RING: 0}
        starts: dict[int, list[int | None]] = {length: [_NEVER] for length in windows}
        step = _TIMING_BYTES >> 2

        def ring_of(at: int) -> bytes:
            # The ring stamps of every series, entry after entry, as bytes (compared in C).
            return b"".join(u32[at + i : at + n * step : step].tobytes() for i in range(4, 4 + _RING))

        def entries_of(ring: bytes) -> dict[int, list[int | None]]:
            words = array("I", ring)
            stamps = list(zip(*(words[i * n : i * n + n] for i in range(_RING)), strict=True))
            for stamps_ in set(stamps).difference(rings):
                rings[stamps_] = len(rings)
                begins = {
                    length: entry
                    for entry, starting in _plan(stamps_, minute, windows)
                    for length in starting
                }
                for length in windows:
                    starts[length].append(begins.get(length))
            numbers = list(map(rings.__getitem__, stamps))
            return {length: list(map(starts[length].__getitem__, numbers)) for length in windows}

        # Every slot's timing headers, field by field across the series (strided, in C).
        slots = []
        kept: set[int] = set()
        union = 0
        for slot in range(self.slots):
            base = self._slots_offset + slot * self.slot_bytes
            header = base >> 2
            if not u32[header + 1]:
                continue  # never claimed
            result.used_slots += 1
            result.dropped += u32[header + 3]
            at = (base + self._counters_offset) >> 3
            counters = list(map(add, counters, u64[at : at + len(counter_names)].tolist()))
            at = (base + self._timings_offset) >> 2
            end = at + n * step
            counts = list(map(add, counts, u64[at >> 1 : end >> 1 : step >> 1].tolist()))
            seconds = list(map(add, seconds, f64[(at >> 1) + 1 : end >> 1 : step >> 1].tolist()))
            ring = ring_of(at)
            entries = entries_of(ring)
            found: set[int] = set()
            for chosen in entries.values():
                found.update(compress(range(n), map(_KEEP.__getitem__, chosen)))
            if found:
                kept |= found
                raw = b"".join(u32[at + i : end : step].tobytes() for i in range(20, 20 + _CHUNKS))
                union |= int.from_bytes(raw, "little")
                slots.append((base, at, array("I", raw), ring, entries))
        # Where each series' chunks go in the integers the windows are summed in: blocks of
        # whole series, each integer small enough that the allocator reuses its memory.
        blocks = _blocks(*_layout(array("I", union.to_bytes(n * _CHUNKS * 4, "little")), kept))
        masks: dict[tuple[int, tuple[bool, ...]], int] = {}
        # Per window and block: every series' counts summed over every slot, one integer of
        # 32-bit fields (no field comes near 2**32). A slot's counts are its running counts
        # less the window's checkpoint (window()): both read in one go, converted once, by one
        # struct and one pair of window() masks for every slot and block (a slot's rows are read
        # up to the most any slot uses: past its own, unused rows), one slot's rows at a time.
        widest = max((rows for *_, rows in blocks), default=0)
        most = max((max(state[2]) for state in slots), default=0)
        sums = {length: [0] * len(blocks) for length in windows}
        for base, at, directories, ring, entries in slots:
            for _ in range(3):
                # The checkpoints before the running counts: both only grow, so the running
                # counts, read last, are at least each checkpoint (modulo 2**31). Then the ring
                # again: a checkpoint written meanwhile (a new minute) means reading again.
                read = {entry for entry in chain.from_iterable(entries.values()) if entry not in _SKIP}
                checkpoints = {
                    entry: split_rows(self._map, base + self._pool_offset + entry * self._entry_bytes, most)
                    for entry in sorted(read)
                }
                running_rows = split_rows(self._map, base + self._running_offset, most)
                again = ring_of(at)
                if again == ring:
                    break
                ring, entries = again, entries_of(again)
            for block, (spans, pick, of_spans, _) in enumerate(blocks):
                pools = pick(directories)
                running = gather(running_rows, pools)
                within: dict[int, int] = {}
                for length, chosen in entries.items():
                    per_series = of_spans(chosen)
                    distinct = set(per_series) - {_NEVER, None}
                    for entry in distinct:
                        if entry not in within:
                            within[entry] = _window(running, gather(checkpoints[entry], pools), widest)
                    if len(distinct) == 1 and None not in per_series:
                        sums[length][block] += within[distinct.pop()]
                        continue
                    # Series whose windows start at different checkpoints (or hold no values):
                    # each checkpoint's window, masked to its series' rows.
                    for entry in distinct:
                        key = (block, tuple(each == entry for each in per_series))
                        if key not in masks:
                            masks[key] = _rows_mask(spans, key[1])
                        sums[length][block] += within[entry] & masks[key]
            del checkpoints, running_rows  # before the next slot's rows are read
        result.live_slots = len(self.live_slots())
        result.totals = {
            name: (count, total)
            for name, count, total in zip(timing_names, counts, seconds, strict=True)
            if count
        }
        result.counters = {name: value for name, value in zip(counter_names, counters, strict=True) if value}
        for length, per_block in sums.items():
            for summed, (spans, _, _, rows) in zip(per_block, blocks, strict=True):
                for series, first, values in _sketches(summed, rows, spans):
                    result.windows.setdefault(timing_names[series], {})[length] = DenseSketch(first, values)
        return result

    def history(self, names: Iterable[str], now: float | None = None) -> dict[str, dict[int, Sketch]]:
        """Return, for each timing series of *names*, its sketch of each of the last 16 minutes.

        Keys are minutes (``time() // 60``); a minute without values is absent. A minute's
        counts are the next minute's checkpoint (or the running counts) less its own.
        """
        self.before_read()
        minute = int((time.time() if now is None else now) // 60)
        timing_names = self.names(True)
        wanted = {timing_names.index(name): name for name in names if name in timing_names}
        unpack_header = _TIMING_HEADER.unpack_from
        row_bits = _ROW_BYTES * 8
        sums: dict[tuple[int, int], int] = {}
        for slot in range(self.slots):
            base = self._slots_offset + slot * self.slot_bytes
            if not self._u32[(base >> 2) + 1]:
                continue
            for series in wanted:
                words = unpack_header(self._map, base + self._timings_offset + series * _TIMING_BYTES)
                directory = words[2 + _RING :]
                used = tuple(compress(range(_CHUNKS), directory))
                if not words[0] or not used:
                    continue
                span = directory[used[0] : used[-1] + 1]
                written = sorted(
                    (stamp - 1, entry) for entry, stamp in enumerate(words[2 : 2 + _RING]) if stamp
                )
                # Oldest first, then the running counts (read last, as in snapshot()).
                marks = [self._rows(base, span, entry) for _, entry in written]
                marks.append(self._rows(base, span, None))
                for (at, _), start, end in zip(written, marks, marks[1:], strict=False):
                    if 0 <= minute - at < _RING:
                        within = _window(end, start, len(span))
                        if within:
                            key = (series, at)
                            sums[key] = sums.get(key, 0) + (within << (used[0] * row_bits))
        result: dict[str, dict[int, Sketch]] = {name: {} for name in wanted.values()}
        for (series, at), summed in sums.items():
            first, found = _fields(summed)
            buckets = dict(compress(zip(range(first, first + len(found)), found, strict=True), found))
            result[wanted[series]][at] = Sketch(buckets=buckets, count=sum(found))
        return result
