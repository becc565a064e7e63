from __future__ import annotations

import threading

from celery import shared_task


@shared_task(name="testapp.add")
def add(x: int, y: int) -> int:
    return x + y


@shared_task(name="testapp.thread_name")
def thread_name() -> str:
    return threading.current_thread().name
