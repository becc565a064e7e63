"""Window arithmetic on a slot's running bucket counts (see :mod:`~django_scale.metrics.store`).

A series' counts in a slot are running counts, 32-bit fields that wrap at 2**31, in chunks of
:data:`CHUNK_BUCKETS` buckets; a ring of per-minute checkpoints holds them as they were at each
minute's first value. A window's counts are the running counts less one checkpoint, taken
field by field in one big-integer subtraction (:func:`window`).

An export reads every series of a slot at once: the rows of its chunks, in the order of the
slot's pool, split into one ``bytes`` each by one :mod:`struct` call (:func:`split_rows`),
then put in the order of a :func:`layout` shared by every slot (:func:`gather`), so that a slot's window of every series is one subtraction and the sum over
slots one addition: no Python-level step per series, chunk or bucket.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import compress
from operator import itemgetter
from typing import Any

from django_scale.metrics.sketch import BUCKETS

__all__ = [
    "blocks",
    "CHUNKS",
    "CHUNK_BUCKETS",
    "fields",
    "gather",
    "layout",
    "picker",
    "plan",
    "rows_mask",
    "split_rows",
    "window",
]

#: Buckets per chunk of a series' counts (a chunk is allocated the first time it is touched).
CHUNK_BUCKETS = 64
#: Chunks that cover every bucket of a sketch.
CHUNKS = -(-BUCKETS // CHUNK_BUCKETS)
ROW_BYTES = CHUNK_BUCKETS * 4
ZERO_ROW = bytes(ROW_BYTES)


@lru_cache(maxsize=32)
def _masks(chunks: int) -> tuple[int, int]:
    """Bit 31 of every 32-bit field of *chunks* chunks, and the 31 bits below it."""
    high = int.from_bytes(b"\0\0\0\x80" * chunks * CHUNK_BUCKETS, "little")
    return high, ((1 << (32 * chunks * CHUNK_BUCKETS)) - 1) ^ high


def window(running: int, checkpoint: int, chunks: int) -> int:
    """Return *running* less *checkpoint*, field by field, modulo 2**31 (fields of 32 bits).

    Both fields are below 2**31 (running counts wrap there): with bit 31 set in every field of
    *running* first, no field borrows from the next, and bit 31 of the result is dropped.
    """
    high, low = _masks(chunks)
    return ((running | high) - checkpoint) & low


def fields(summed: int) -> tuple[int, array[int]]:
    """Return the first bucket that holds values and the counts from it to the last, off *summed*."""
    # The buckets from the first to the last that hold values, as an array, in C.
    low = ((summed & -summed).bit_length() - 1) >> 5
    high = (summed.bit_length() + 31) >> 5
    return low, array("I", (summed >> (low << 5)).to_bytes((high - low) * 4, "little"))


# An export reads every slot with one struct (rows: the most any slot uses), about 36 bytes a
# row: the latest two are kept, as the pool of a slot grows.
@lru_cache(maxsize=2)
def _rows_struct(rows: int, gap: int) -> struct.Struct:
    pad = f"{gap}x" if gap else ""
    return struct.Struct(f"{ROW_BYTES}s{pad}" * (rows - 1) + f"{ROW_BYTES}s" if rows else "")


def split_rows(buffer: object, offset: int, rows: int, stride: int = ROW_BYTES) -> tuple[bytes, ...]:
    """Return :data:`ZERO_ROW`, then *rows* rows read from *offset* every *stride* bytes, in C."""
    return (ZERO_ROW, *_rows_struct(rows, stride - ROW_BYTES).unpack_from(buffer, offset))  # type: ignore[arg-type]


def gather(rows: Sequence[bytes], indexes: Sequence[int]) -> int:
    """Return ``rows[i]`` for each of *indexes*, one after the other, as one little-endian integer."""
    if len(indexes) == 1:
        return int.from_bytes(rows[indexes[0]], "little")
    return int.from_bytes(b"".join(itemgetter(*indexes)(rows)), "little") if indexes else 0


def layout(used: Sequence[int], series: Iterable[int]) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """Return where each series' chunks go in the integers an export adds up (the same for every slot).

    *used* is nonzero where any slot uses a chunk of a series, chunk after chunk: ``used[chunk *
    count + series]`` with ``count = len(used) // CHUNKS``. Each of *series* takes one row per
    chunk from its first used to its last, series after series. Return, per series that uses
    any chunk, ``(series, first chunk, chunks, first row)``, and, per row, its place in *used*.
    """
    count = len(used) // CHUNKS
    spans: list[tuple[int, int, int, int]] = []
    places: list[int] = []
    for each in sorted(series):
        chunks = list(compress(range(CHUNKS), used[each::count]))
        if chunks:
            first, last = chunks[0], chunks[-1]
            spans.append((each, first, last - first + 1, len(places)))
            places.extend(range(first * count + each, last * count + each + 1, count))
    return spans, places


#: Rows of a block (see :func:`blocks`): 32 KiB integers, well below the allocator's mmap threshold
#: (smaller blocks: a lower peak of memory, so fewer page faults in a first export).
BLOCK_ROWS = 128


def blocks(
    spans: Sequence[tuple[int, int, int, int]], places: Sequence[int]
) -> list[
    tuple[
        list[tuple[int, int, int, int]],
        Callable[[Sequence[int]], tuple[int, ...]],
        Callable[[Sequence[Any]], tuple[Any, ...]],
        int,
    ]
]:
    """Split :func:`layout`'s rows in blocks of whole series of about :data:`BLOCK_ROWS` rows.

    Per block: its spans (rows from the block's start), a picker of its rows' places in a
    slot's directories, a picker of its series in a per-series list, and its rows.
    """
    out = []
    start = 0
    group: list[tuple[int, int, int, int]] = []
    for index, span in enumerate(spans):
        group.append(span)
        end = spans[index + 1][3] if index + 1 < len(spans) else len(places)
        if end - start >= BLOCK_ROWS or index + 1 == len(spans):
            rebased = [(series, chunk, chunks, row - start) for series, chunk, chunks, row in group]
            out.append(
                (rebased, picker(places[start:end]), picker([series for series, *_ in group]), end - start)
            )
            start, group = end, []
    return out


def rows_mask(spans: Sequence[tuple[int, int, int, int]], keep: Iterable[bool]) -> int:
    """Return the integer with every bit of the rows of the series of *spans* that *keep* says set."""
    ones = b"\xff" * ROW_BYTES
    return int.from_bytes(
        b"".join(
            (ones if kept else ZERO_ROW) * chunks for (_, _, chunks, _), kept in zip(spans, keep, strict=True)
        ),
        "little",
    )


def plan(stamps: tuple[int, ...], minute: int, windows: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
    """Return, for ring *stamps* read at *minute*, each checkpoint to read and the windows it starts.

    A window starts at the checkpoint of its earliest minute that has values (none: the window
    is empty). Minutes ahead of *minute* (a writer's clock ahead of the reader's) count in
    every window their values are in, the running counts.
    """
    aged = sorted(
        ((minute + 1 - stamp, entry) for entry, stamp in enumerate(stamps) if stamp and stamp <= minute + 1),
        reverse=True,
    )
    starts: dict[int, list[int]] = {}
    for length in windows:
        for age, entry in aged:
            if age <= length:
                starts.setdefault(entry, []).append(length)
                break
    return [(entry, tuple(starting)) for entry, starting in starts.items()]


def picker(places: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """Return a function of a sequence that picks its items at *places*, as a tuple, in C."""
    if len(places) == 1:
        place = places[0]
        return lambda items: (items[place],)
    if not places:
        return lambda items: ()
    return itemgetter(*places)


def sketches(
    summed: int, rows: int, spans: Iterable[tuple[int, int, int, int]]
) -> Iterator[tuple[int, int, array[int]]]:
    """Yield, per series of *spans* that holds values in *summed*, its first bucket and counts on."""
    if not summed:
        return
    data = summed.to_bytes(rows * ROW_BYTES, "little")
    for series, chunk, chunks, row in spans:
        region = data[row * ROW_BYTES : (row + chunks) * ROW_BYTES]
        # The fields from the first that holds values to the last, found in C.
        values = region.rstrip(b"\0")
        if values:
            first = (len(values) - len(values.lstrip(b"\0"))) >> 2
            yield (
                series,
                chunk * CHUNK_BUCKETS + first,
                array("I", region[first * 4 : (len(values) + 3) & ~3]),
            )
