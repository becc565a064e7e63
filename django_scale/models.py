"""django-scale's tables: backfill checkpoints and the cache's journal of pending invalidations.

* :class:`BackfillCheckpoint`: how far a resumable backfill (``django_scale.backfill``) got.
* :class:`PendingInvalidation`: an invalidation the cache could not take while it was down,
  kept on the primary so that any process replays it once the cache answers
  (``django_scale.cache.invalidations``).
"""

from __future__ import annotations

from django.db import models

__all__ = ["BackfillCheckpoint", "PendingInvalidation"]


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
        db_table = "django_scale_backfill_checkpoint"
        verbose_name = "backfill checkpoint"

    def __str__(self) -> str:
        return self.name


class PendingInvalidation(models.Model):
    """An invalidation made while its cache was down, replayed by any process once the cache answers.

    Written only when the cache cannot take the invalidation (never on the healthy path), in
    the caller's transaction when there is one, and deleted once replayed.
    """

    #: The cache alias the invalidated key lives in.
    alias = models.CharField(max_length=200)
    #: The part of the key before its argument digest: the function's path and version.
    group = models.TextField()
    #: The key (without the cache's ``KEY_PREFIX``); empty for every key of *group*.
    key = models.TextField(blank=True)
    #: Seconds the key's generation must outlive the entry (see ``Engine.invalidate``).
    keep_for = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "django_scale_pending_invalidation"
        verbose_name = "pending invalidation"

    def __str__(self) -> str:
        return f"{self.alias}: {self.key or self.group + ':*'}"
