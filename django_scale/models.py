"""django-scale's table: the cache's journal of pending invalidations.

Backfill checkpoints live in their own app, :mod:`django_scale.contrib.backfill`.

* :class:`PendingInvalidation`: an invalidation the cache could not take while it was down,
  kept on the primary so that any process replays it once the cache answers
  (``django_scale.cache.invalidations``).
"""

from __future__ import annotations

from django.db import models

__all__ = ["PendingInvalidation"]


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
