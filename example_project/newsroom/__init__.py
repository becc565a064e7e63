"""The newsroom example project: a small news site that demonstrates django-scale."""

from __future__ import annotations

# Load the Celery app with Django, so @shared_task binds to it.
from newsroom.celery import app as celery_app

__all__ = ["celery_app"]
