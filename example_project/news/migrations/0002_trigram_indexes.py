from __future__ import annotations

from typing import Any

from django.db import migrations

import django_scale.indexes


def create_pg_trgm(apps: Any, schema_editor: Any) -> None:
    """CREATE EXTENSION pg_trgm on PostgreSQL; nothing elsewhere.

    What django.contrib.postgres.operations.TrigramExtension does, without importing
    django.contrib.postgres.operations, which needs a PostgreSQL driver installed: the demo on
    SQLite runs with none (README: ``pip install -e .``).
    """
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")


class Migration(migrations.Migration):
    dependencies = [("news", "0001_initial")]

    operations = [
        migrations.RunPython(create_pg_trgm, migrations.RunPython.noop, elidable=True),
        migrations.AddIndex(
            model_name="author",
            index=django_scale.indexes.TrigramIndex(fields=["name"], name="news_author_name_trgm"),
        ),
        migrations.AddIndex(
            model_name="article",
            index=django_scale.indexes.TrigramIndex(fields=["title"], name="news_article_title_trgm"),
        ),
        migrations.AddIndex(
            model_name="comment",
            index=django_scale.indexes.TrigramIndex(fields=["author_name"], name="news_comment_author_trgm"),
        ),
    ]
