"""Progress of a long batched job (a backfill, the ``COPY`` pipe): :class:`Progress`, :func:`progress_bar`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.management.base import OutputWrapper

__all__ = ["Progress", "progress_bar"]


@dataclass(frozen=True)
class Progress:
    """Where a running job is, passed to the progress callback after every batch."""

    name: str
    rows_done: int
    rows_total: int | None
    batch_size: int
    rows_per_second: float


def progress_bar(stream: Any = None, width: int = 30) -> Callable[[Progress], None]:
    """Return a progress callback drawing a bar on *stream* (default: stderr).

    *stream* is a file or a management command's ``self.stdout``/``self.stderr``
    (:class:`~django.core.management.base.OutputWrapper`, written unstyled and without its
    added line ending). On a terminal the bar redraws in place; otherwise a line is written at
    most once a second, and always for the last batch.
    """
    out = stream or sys.stderr
    interactive = bool(getattr(out, "isatty", lambda: False)())
    write: Callable[[str], object] = out.write
    if isinstance(out, OutputWrapper):
        wrapper = out

        def write(text: str) -> None:
            wrapper.write(text, style_func=str, ending="")

    last_line = [0.0]

    def draw(progress: Progress) -> None:
        total = progress.rows_total or 0
        fraction = min(progress.rows_done / total, 1.0) if total else 0.0
        filled = int(width * fraction)
        line = (
            f"{progress.name}: [{'#' * filled}{'.' * (width - filled)}] "
            f"{progress.rows_done:,}/{total:,}{'~' if total else '?'} rows "
            f"({fraction:.0%}), {progress.rows_per_second:,.0f} rows/s, batch {progress.batch_size:,}"
        )
        if interactive:
            write("\r" + line)
            out.flush()
        elif time.monotonic() - last_line[0] >= 1.0 or (total and progress.rows_done >= total):
            last_line[0] = time.monotonic()
            write(line + "\n")
            out.flush()

    return draw
