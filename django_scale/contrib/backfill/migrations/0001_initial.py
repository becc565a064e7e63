from __future__ import annotations

from typing import Any

from django.db import migrations, models


class CreateModelUnlessTableExists(migrations.CreateModel):
    """Create the model's table, or adopt the one ``django_scale``'s migration 0001 created.

    Installs that applied ``django_scale.0001`` before the app existed have the table and its checkpoints;
    they keep both (nothing is dropped or recreated). Fresh installs get the table here.
    Reversed, the table is dropped, as for any ``CreateModel``.
    """

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = to_state.apps.get_model(app_label, self.name)
        connection = schema_editor.connection
        with connection.cursor() as cursor:
            tables = connection.introspection.table_names(cursor)
        if model._meta.db_table in tables:
            return
        super().database_forwards(app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        CreateModelUnlessTableExists(
            name="BackfillCheckpoint",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=200, unique=True)),
                ("last_key", models.JSONField(blank=True, null=True)),
                ("rows_done", models.BigIntegerField(default=0)),
                ("batches_done", models.BigIntegerField(default=0)),
                ("rows_total", models.BigIntegerField(blank=True, null=True)),
                ("started_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                ("finished_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={
                "verbose_name": "backfill checkpoint",
                "db_table": "django_scale_backfill_checkpoint",
            },
        ),
    ]
