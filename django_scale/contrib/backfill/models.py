"""The backfill app's table: how far each resumable backfill got."""

from __future__ import annotations

from django.db import models

__all__ = ["BackfillCheckpoint"]


class BackfillCheckpoint(models.Model):
    """How far a backfill has got: the key of the last row it processed, committed with its batch."""

    #: The backfill's name (``Backfill.name``).
    name = models.CharField(max_length=200, unique=True)
    #: The unique key of the last row processed, as JSON; ``null`` before the first batch.
    last_key = models.JSONField(null=True, blank=True)
    #: Rows processed so far.
    rows_done = models.BigIntegerField(default=0)
    #: Batches committed so far.
    batches_done = models.BigIntegerField(default=0)
    #: An estimate of the rows to process, taken when the backfill started.
    rows_total = models.BigIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    #: When the last batch was processed; ``null`` while the backfill is unfinished.
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        # The table django_scale's own migration 0001 created before the app had its own:
        # kept, so that existing installs adopt their table and its rows (migration 0001).
        db_table = "django_scale_backfill_checkpoint"
        verbose_name = "backfill checkpoint"

    def __str__(self) -> str:
        return self.name
