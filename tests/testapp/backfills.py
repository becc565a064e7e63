"""Backfills the suite runs, in-process and in a subprocess that it kills."""

from __future__ import annotations

import os
import time

from django.db.models import QuerySet

from django_scale.contrib.backfill.runner import Backfill

from testapp.models import BackfillLog, BackfillSource


class DoubleValues(Backfill[BackfillSource]):
    """Set ``doubled`` and log each row once (a second log row would be a duplicate)."""

    name = "double-values"
    batch_size = 25

    def get_queryset(self) -> QuerySet[BackfillSource]:
        return BackfillSource.objects.all()

    def process(self, batch: list[BackfillSource]) -> None:
        for row in batch:
            row.doubled = row.value * 2
        BackfillSource.objects.bulk_update(batch, ["doubled"])
        BackfillLog.objects.bulk_create([BackfillLog(source_id=row.pk) for row in batch])
        # Slow enough that the suite can kill the process between and inside batches.
        time.sleep(float(os.environ.get("BACKFILL_BATCH_SLEEP", "0")))
