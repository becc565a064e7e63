"""Celery tasks of django-scale, with fixed names: ``django_scale.refresh`` and ``django_scale.snipe``.

Importing this module (as ``app.autodiscover_tasks()`` does) registers the tasks and connects
no signal handler: tasks read what the request that enqueued them wrote once the project calls
:func:`django_scale.task_routing.connect_signals` (re-exported here).
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from django_scale.cache.engine import REFRESH_TASK
from django_scale.cache.task import run_refill_task
from django_scale.task_routing import HEADER, add_position, connect_signals, disconnect_signals

__all__ = ["HEADER", "add_position", "connect_signals", "disconnect_signals", "refresh", "snipe"]


@shared_task(name="django_scale.snipe", ignore_result=False)
def snipe(dry_run: bool | None = None) -> dict[str, Any]:
    """Run the query sniper once (for Celery beat); return what it did, JSON-able.

    Schedule it every few seconds, e.g. ``CELERY_BEAT_SCHEDULE = {"snipe": {"task":
    "django_scale.snipe", "schedule": 10.0}}``. *dry_run* overrides ``SNIPER_DRY_RUN``.
    """
    from django_scale.sniper import snipe as run_sniper

    return run_sniper(dry_run=dry_run).as_dict()


@shared_task(name=REFRESH_TASK, ignore_result=True)
def refresh(
    path: str, alias: str, key: str, token: str, generation: int, arguments: Any, primary: bool
) -> bool:
    """Recompute one stale entry of a ``stale_while_revalidate`` function or ``swr_cache_page`` view.

    *path* is the dotted path the function is registered under, *arguments* its JSON-able
    arguments, *token* the claim the enqueuing caller won and *generation* the key's
    generation then: the value is written only if the key was not invalidated since. With
    *primary*, the enqueuing request had written, so the recomputation reads the primary.
    Return whether the value was written.

    The message is not trusted (anyone who can write to the broker can send one): the
    function must be registered (only modules of installed apps and the URLconf are imported
    to find it), *key* must be the key the function's own key code makes of *arguments*, and
    *alias* its cache; any other message is logged and dropped (see
    :func:`django_scale.cache.task.run_refill_task`).
    """
    return run_refill_task(path, alias, key, token, generation, arguments, primary)
