from __future__ import annotations

from django.apps import AppConfig

__all__ = ["BackfillConfig"]


class BackfillConfig(AppConfig):
    """Resumable backfills: the checkpoint table and ``manage.py scale_backfill``."""

    name = "django_scale.contrib.backfill"
    # Not "backfill": a project may well have an app of that name.
    label = "django_scale_backfill"
    verbose_name = "django-scale backfills"
    default_auto_field = "django.db.models.BigAutoField"
