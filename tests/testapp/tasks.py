from __future__ import annotations

import threading

from celery import shared_task


@shared_task(name="testapp.add")
def add(x: int, y: int) -> int:
    return x + y


@shared_task(name="testapp.thread_name")
def thread_name() -> str:
    return threading.current_thread().name


@shared_task(name="testapp.author_exists")
def author_exists(pk: int) -> dict[str, object]:
    """Report whether the worker sees author *pk*, and where its read went."""
    from django_scale.replicas import current_state

    from testapp.models import Author

    found = Author.objects.filter(pk=pk).exists()
    state = current_state()
    return {"found": found, "reads": dict(state.reads) if state else None}
