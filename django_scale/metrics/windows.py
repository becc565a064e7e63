"""Window arithmetic on a slot's running bucket counts (see :mod:`~django_scale.metrics.store`).

A series' counts in a slot are running counts, 32-bit fields that wrap at 2**31, in chunks of
:data:`CHUNK_BUCKETS` buckets; a ring of per-minute checkpoints holds them as they were at each
minute's first value. A window's counts are the running counts less one checkpoint, taken
field by field in one big-integer subtraction (:func:`window`).
"""

from __future__ import annotations

from array import array

from django_scale.metrics.sketch import BUCKETS

__all__ = ["CHUNKS", "CHUNK_BUCKETS", "fields", "plan", "window"]

#: Buckets per chunk of a series' counts (a chunk is allocated the first time it is touched).
CHUNK_BUCKETS = 64
#: Chunks that cover every bucket of a sketch.
CHUNKS = -(-BUCKETS // CHUNK_BUCKETS)
# Per number of chunks: bit 31 of every 32-bit field, and the 31 bits below it.
HIGH = [int.from_bytes(b"\0\0\0\x80" * chunks * CHUNK_BUCKETS, "little") for chunks in range(CHUNKS + 1)]
LOW = [((1 << (32 * chunks * CHUNK_BUCKETS)) - 1) ^ high for chunks, high in enumerate(HIGH)]


def window(running: int, checkpoint: int, chunks: int) -> int:
    """Return *running* less *checkpoint*, field by field, modulo 2**31 (fields of 32 bits).

    Both fields are below 2**31 (running counts wrap there): with bit 31 set in every field of
    *running* first, no field borrows from the next, and bit 31 of the result is dropped.
    """
    return ((running | HIGH[chunks]) - checkpoint) & LOW[chunks]


def fields(summed: int) -> tuple[int, array[int]]:
    """Return the first bucket that holds values and the counts from it to the last, off *summed*."""
    # The buckets from the first to the last that hold values, as an array, in C.
    low = ((summed & -summed).bit_length() - 1) >> 5
    high = (summed.bit_length() + 31) >> 5
    return low, array("I", (summed >> (low << 5)).to_bytes((high - low) * 4, "little"))


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
