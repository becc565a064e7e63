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

import time
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from django.core.serializers.json import DjangoJSONEncoder
from django.db import router, transaction
from django.db.models import F, Model, QuerySet
from django.utils import timezone

from django_scale.bulk import iter_batches, key_field
from django_scale.bulk.progress import Progress as BackfillProgress
from django_scale.bulk.progress import progress_bar
from django_scale.contrib.backfill.models import BackfillCheckpoint
from django_scale.counting import approx_count
from django_scale.exceptions import BulkError

__all__ = ["Backfill", "BackfillProgress", "Checkpointer", "decode_key", "progress_bar", "run_backfill"]

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


def decode_key(model: type[Model], key: str, value: Any) -> Any:
    """Return a checkpoint's *value* (JSON) as *model*'s *key* field's Python value."""
    return _decode(model, key, value)


def _decode(model: type[Model], key: str, value: Any) -> Any:
    if value is None:
        return None
    return key_field(model, key).to_python(value)


def _encode(value: Any) -> Any:
    return DjangoJSONEncoder().default(value) if not isinstance(value, (int, str, float)) else value


class Checkpointer:
    """A named checkpoint on *alias*: where a resumable job got, committed with each batch.

    The one implementation of "commit a batch with its checkpoint", shared by
    :func:`run_backfill` and the ``COPY`` pipe (:func:`django_scale.bulk.copy_between`). The
    checkpoint row is locked in each batch's transaction and must still hold the key this
    runner last wrote, so two runners of one job cannot both process a batch.
    """

    def __init__(self, name: str, alias: str) -> None:
        self.name = name
        self.alias = alias
        self.rows = BackfillCheckpoint.objects.using(alias)
        self.checkpoint, _ = self.rows.get_or_create(name=name)
        #: The key of the last row committed (as JSON), ``None`` before the first batch.
        self.expected: Any = self.checkpoint.last_key

    @property
    def finished(self) -> bool:
        return self.checkpoint.finished_at is not None

    def estimate(self, total: Callable[[], int]) -> None:
        """Record *total()* as the rows to process, once, when the job starts."""
        if self.checkpoint.rows_total is None:
            self.checkpoint.rows_total = int(total())
            self.rows.filter(pk=self.checkpoint.pk).update(rows_total=self.checkpoint.rows_total)

    def commit(self, last: Any, work: Callable[[], int]) -> int:
        """Run *work()* (returning its row count) and move the checkpoint to *last*, in one transaction."""
        last = _encode(last)
        with transaction.atomic(using=self.alias):
            locked = self.rows.select_for_update().get(pk=self.checkpoint.pk)
            if locked.last_key != self.expected:
                raise BulkError(
                    f"The checkpoint of {self.name!r} moved from {self.expected!r} to "
                    f"{locked.last_key!r} while this run held it: another runner is processing it. "
                    "Run one at a time."
                )
            done = work()
            self.rows.filter(pk=self.checkpoint.pk).update(
                last_key=last,
                rows_done=F("rows_done") + done,
                batches_done=F("batches_done") + 1,
                updated_at=timezone.now(),
            )
        self.expected = last
        self.checkpoint.refresh_from_db(using=self.alias, fields=["rows_done", "rows_total"])
        return done

    def finish(self) -> BackfillCheckpoint:
        """Mark the job finished and return the checkpoint."""
        self.rows.filter(pk=self.checkpoint.pk).update(finished_at=timezone.now(), updated_at=timezone.now())
        self.checkpoint.refresh_from_db(using=self.alias)
        return self.checkpoint


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
    checkpointer = Checkpointer(name, alias)
    checkpoint = checkpointer.checkpoint
    if checkpointer.finished:
        return checkpoint
    checkpointer.estimate(lambda: approx_count(queryset.using(alias)))
    start = _decode(model, backfill.key, checkpointer.expected)
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

        def work(batch: list[Any] = batch) -> int:
            backfill.process(batch)
            return len(batch)

        done_here += checkpointer.commit(getattr(batch[-1], attname), work)
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
    return checkpointer.finish()
