"""Resumable backfills: process a big table in keyset batches, each committed with its checkpoint.

Subclass :class:`Backfill`, give it a queryset and a ``process(batch)``, and run it with
``manage.py scale_backfill run dotted.path.ToTheClass`` (or :func:`run_backfill`). Every batch
is processed in one transaction together with the update of the backfill's
:class:`~django_scale.contrib.backfill.models.BackfillCheckpoint` row, so a backfill killed at any moment (even
with ``SIGKILL``) resumes after the last committed batch: no row is processed twice and none is
skipped. The checkpoint row is locked (``SELECT ... FOR UPDATE``) in each batch's transaction
and must still hold the key this runner last wrote, so two runners of one backfill cannot both
process a batch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from django.core.management.base import OutputWrapper
from django.core.serializers.json import DjangoJSONEncoder
from django.db import router, transaction
from django.db.models import F, Model, QuerySet
from django.utils import timezone

from django_scale.bulk import iter_batches, key_field
from django_scale.contrib.backfill.models import BackfillCheckpoint
from django_scale.counting import approx_count
from django_scale.exceptions import BulkError

__all__ = ["Backfill", "BackfillProgress", "progress_bar", "run_backfill"]

M = TypeVar("M", bound=Model)


class Backfill(Generic[M]):
    """A resumable job over a queryset. Subclass it; set the attributes and ``process()``."""

    #: The checkpoint's name; default: the class's dotted path.
    name: ClassVar[str] = ""
    #: Rows per batch (the first batch, when ``target_seconds`` adapts it).
    batch_size: ClassVar[int] = 1000
    #: A unique field to page on.
    key: ClassVar[str] = "pk"
    #: Seconds a batch should take; the batch size adapts toward it. ``None``: fixed size.
    target_seconds: ClassVar[float | None] = None
    #: The database alias for the checkpoint and the batches' transactions; default: the
    #: router's write database for the queryset's model.
    using: ClassVar[str | None] = None

    def get_queryset(self) -> QuerySet[M]:
        """Return the rows to process. Its ordering is replaced by ``key``'s."""
        raise NotImplementedError(f"{type(self).__name__} must define get_queryset().")

    def process(self, batch: list[M]) -> None:
        """Process one batch of rows, inside the batch's transaction."""
        raise NotImplementedError(f"{type(self).__name__} must define process(batch).")

    @classmethod
    def checkpoint_name(cls) -> str:
        """Return the name of this backfill's checkpoint."""
        return cls.name or f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class BackfillProgress:
    """Where a running backfill is, passed to the progress callback after every batch."""

    name: str
    rows_done: int
    rows_total: int | None
    batch_size: int
    rows_per_second: float


def _decode(model: type[Model], key: str, value: Any) -> Any:
    if value is None:
        return None
    return key_field(model, key).to_python(value)


def _encode(value: Any) -> Any:
    return DjangoJSONEncoder().default(value) if not isinstance(value, (int, str, float)) else value


def run_backfill(
    backfill: Backfill[Any],
    *,
    progress: Callable[[BackfillProgress], None] | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
) -> BackfillCheckpoint:
    """Run *backfill* from its checkpoint to the end (or for *max_batches* batches).

    Return the checkpoint. A finished backfill does nothing; reset its checkpoint (``manage.py
    scale_backfill reset NAME``) to run it again.
    """
    queryset = backfill.get_queryset()
    model = queryset.model
    alias = backfill.using or router.db_for_write(model)
    name = backfill.checkpoint_name()
    checkpoints = BackfillCheckpoint.objects.using(alias)
    checkpoint, created = checkpoints.get_or_create(name=name)
    if checkpoint.finished_at is not None:
        return checkpoint
    if checkpoint.rows_total is None:
        checkpoint.rows_total = int(approx_count(queryset.using(alias)))
        checkpoints.filter(pk=checkpoint.pk).update(rows_total=checkpoint.rows_total)
    expected = checkpoint.last_key
    start = _decode(model, backfill.key, expected)
    size = batch_size or backfill.batch_size
    started = time.monotonic()
    done_here = 0
    attname = key_field(model, backfill.key).attname
    for batches, batch in enumerate(
        iter_batches(
            queryset.using(alias),
            size,
            key=backfill.key,
            start_after=start,
            target_seconds=backfill.target_seconds,
        ),
        start=1,
    ):
        last = _encode(getattr(batch[-1], attname))
        with transaction.atomic(using=alias):
            locked = checkpoints.select_for_update().get(pk=checkpoint.pk)
            if locked.last_key != expected:
                raise BulkError(
                    f"The checkpoint of backfill {name!r} moved from {expected!r} to "
                    f"{locked.last_key!r} while this run held it: another runner is processing it. "
                    "Run one at a time."
                )
            backfill.process(batch)
            checkpoints.filter(pk=checkpoint.pk).update(
                last_key=last,
                rows_done=F("rows_done") + len(batch),
                batches_done=F("batches_done") + 1,
                updated_at=timezone.now(),
            )
        expected = last
        done_here += len(batch)
        checkpoint.refresh_from_db(using=alias, fields=["rows_done", "rows_total"])
        if progress is not None:
            elapsed = max(time.monotonic() - started, 1e-9)
            progress(
                BackfillProgress(
                    name, checkpoint.rows_done, checkpoint.rows_total, len(batch), done_here / elapsed
                )
            )
        if max_batches is not None and batches >= max_batches:
            checkpoint.refresh_from_db(using=alias)
            return checkpoint
    checkpoints.filter(pk=checkpoint.pk).update(finished_at=timezone.now(), updated_at=timezone.now())
    checkpoint.refresh_from_db(using=alias)
    return checkpoint


def progress_bar(stream: Any = None, width: int = 30) -> Callable[[BackfillProgress], None]:
    """Return a progress callback drawing a bar on *stream* (default: stderr).

    *stream* is a file or a management command's ``self.stdout``/``self.stderr``
    (:class:`~django.core.management.base.OutputWrapper`, written unstyled and without its
    added line ending). On a terminal the bar redraws in place; otherwise a line is written at
    most once a second.
    """
    out = stream or sys.stderr
    interactive = bool(getattr(out, "isatty", lambda: False)())
    write: Callable[[str], object] = out.write
    if isinstance(out, OutputWrapper):
        wrapper = out

        def write(text: str) -> None:
            wrapper.write(text, style_func=str, ending="")

    last_line = [0.0]

    def draw(progress: BackfillProgress) -> None:
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
        elif time.monotonic() - last_line[0] >= 1.0:
            last_line[0] = time.monotonic()
            write(line + "\n")
            out.flush()

    return draw
