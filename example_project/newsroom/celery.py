"""The newsroom's Celery app, configured from the ``CELERY_*`` Django settings."""

from __future__ import annotations

import os

from celery import Celery

from django_scale.task_routing import connect_signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "newsroom.settings")

app = Celery("newsroom")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Tasks read what the request that enqueued them wrote (docs/routing.md, "Celery tasks").
connect_signals()
