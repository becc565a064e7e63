"""The Celery app of the test suite, configured from the Django settings like a project's."""

from __future__ import annotations

from celery import Celery

from django_scale.task_routing import connect_signals

app = Celery("django_scale_tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["testapp", "django_scale"])
# Tasks read what the request that enqueued them wrote.
connect_signals()
