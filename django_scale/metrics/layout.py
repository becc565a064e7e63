"""The host's metrics file, format v3: the sizes and places its store and its readers share.

The file holds a header (:data:`HEADER_BYTES`), the series' names (:data:`NAME_BYTES` each),
then one slot per worker: a slot header (:data:`SLOT_HEADER`), a timing header per timing
series (:data:`TIMING_BYTES`: count, sum, ring stamps, chunk directory, latest minute), the
counters, and a pool of chunk rows (see :mod:`~django_scale.metrics.store`).
"""

from __future__ import annotations

import struct

from django_scale.metrics.windows import CHUNK_BUCKETS, CHUNKS, ROW_BYTES

#: The sliding windows, in minutes: each is the current minute and that many before it.
WINDOWS = (1, 5, 15)

MAGIC = b"DJSCALE3"
RING = 16  # checkpoints kept: the current minute and 15 before it (the longest window)
CHUNK_SHIFT = 6
CHUNK_MASK = CHUNK_BUCKETS - 1
CHUNK_BYTES = RING * ROW_BYTES  # a chunk's checkpoints
NAME_BYTES = 256
HEADER_BYTES = 4096
SLOT_HEADER = 64
# A slot's header, u32 words: holder's pid, holders so far, pool chunks used, values dropped.
# A timing's header: count u64, sum f64, stamps (minute + 1) u32 x 16, directory u32 x CHUNKS.
STAMPS = 16
DIRECTORY = STAMPS + 4 * RING
# After the directory, the series' latest minute + 1 (never goes back; the owner's only).
LATEST = DIRECTORY + 4 * CHUNKS
TIMING_BYTES = -(-(LATEST + 4) // 64) * 64
TIMING_HEADER = struct.Struct(f"=Qd{RING}I{CHUNKS}I")
# Lock bytes lie past the end of the file (POSIX allows it), one per slot and one for names.
LOCK_BASE = 1 << 40
NAMES_LOCK = LOCK_BASE - 1
OVERFLOW = "\x1foverflow"
# A series' checkpoint in a slot where it never had a value (its rows are zero rows).
NEVER = -1
# Whether a series is read for a window: not when its window starts at no checkpoint (None).
KEEP: dict[int | None, int] = {None: 0, NEVER: 0, **dict.fromkeys(range(RING), 1)}
SKIP = (None, NEVER)
