from __future__ import annotations

from django.contrib.postgres.operations import TrigramExtension
from django.db import migrations

import django_scale.indexes


class Migration(migrations.Migration):
    dependencies = [("news", "0001_initial")]

    operations = [
        # CREATE EXTENSION pg_trgm on PostgreSQL; nothing on SQLite.
        TrigramExtension(),
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
