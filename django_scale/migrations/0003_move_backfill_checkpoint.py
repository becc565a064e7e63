from __future__ import annotations

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("django_scale", "0002_pending_invalidation"),
    ]

    # BackfillCheckpoint now belongs to django_scale.contrib.backfill, whose migration 0001
    # adopts the table: remove the model from this app's state only, never drop the table
    # (its rows are the checkpoints of backfills that may still be running).
    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="BackfillCheckpoint")],
            database_operations=[],
        ),
    ]
