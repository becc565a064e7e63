from __future__ import annotations

from django.contrib.postgres.operations import TrigramExtension
from django.db import migrations

import django_scale.indexes


class Migration(migrations.Migration):
    dependencies = [("testapp", "0001_initial")]

    operations = [
        # CREATE EXTENSION pg_trgm on PostgreSQL; nothing elsewhere.
        TrigramExtension(),
        migrations.AddIndex(
            model_name="article",
            index=django_scale.indexes.TrigramIndex(fields=["title"], name="testapp_article_title_trgm"),
        ),
    ]
