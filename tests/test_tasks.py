"""Tests of django_scale.tasks and task_routing: importing connects nothing; connect_signals() connects once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import signals

from django_scale import task_routing as tasks

UIDS = {
    "before_task_publish": "django_scale.tasks.add_position",
    "task_prerun": "django_scale.tasks.open_state",
    "task_postrun": "django_scale.tasks.close_state",
}


def connected() -> dict[str, int]:
    """Return how many times each of the module's handlers is connected, by signal."""
    return {
        name: sum(1 for key, _ in getattr(signals, name).receivers if key[0] == uid)
        for name, uid in UIDS.items()
    }


@pytest.fixture
def disconnected() -> Iterator[None]:
    """Start with the handlers disconnected; leave them as they were."""
    was = connected()
    tasks.disconnect_signals()
    yield
    tasks.disconnect_signals()
    if any(was.values()):
        tasks.connect_signals()


#: A process that lists django_scale and imports its tasks, as autodiscover_tasks() does.
IMPORT_ONLY = """
import django
from django.conf import settings
settings.configure(INSTALLED_APPS=["django_scale"])
django.setup()
import django_scale.tasks
import django_scale.task_routing
from celery import signals
print(sum(1 for name in ("before_task_publish", "task_prerun", "task_postrun")
          for key, _ in getattr(signals, name).receivers if str(key[0]).startswith("django_scale")))
"""


def test_importing_the_tasks_connects_no_handler(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_connect_signals_connects_each_handler_once(disconnected: None) -> None:
    tasks.connect_signals()
    tasks.connect_signals()
    assert connected() == dict.fromkeys(UIDS, 1)
    tasks.disconnect_signals()
    assert connected() == dict.fromkeys(UIDS, 0)
