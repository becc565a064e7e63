"""``pip install django-scale`` alone, in a fresh virtualenv, as a user installs it.

The suite's own environment has every extra installed, which hides a missing dependency: this
test builds the wheel, installs it with only the documented command into a new virtualenv, and
runs a real ``celery -A proj worker`` with a Redis broker that runs ``django_scale.refresh``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

import harness

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.redis, pytest.mark.once]

SETTINGS = """
SECRET_KEY = "install-test"
INSTALLED_APPS = ["django.contrib.contenttypes", "django_scale", "shop"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}}
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "%(cache)s",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 1},
    }
}
CELERY_BROKER_URL = "%(broker)s"
USE_TZ = True
"""
CELERY = """
import os
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
"""
PRICES = """
import os
from django_scale.cache import stale_while_revalidate


@stale_while_revalidate(fresh=0.5, stale=3600)
def served_by() -> int:
    return os.getpid()
"""
WEB = """
import os, time, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
django.setup()
from django.core.checks import run_checks
print("checks:", sorted(m.id for m in run_checks() if m.id.startswith("django_scale")))
from shop.prices import served_by
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    if served_by() != os.getpid():
        print("refilled by another process")
        break
    time.sleep(0.2)
else:
    print("never refilled by the worker")
"""


def _run(*command: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, check=False, **kwargs
    )
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result


def test_a_celery_worker_with_a_redis_broker_runs_refills_from_a_plain_install(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, timeout=120)
    python = venv / "bin" / "python"
    # Built from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout.
    source = tmp_path / "source"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__")
    )
    dist = tmp_path / "dist"
    _run(python, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, source, timeout=300)
    [wheel] = dist.glob("django_scale-*.whl")
    # The documented command, nothing else (docs/installation.md): Celery's Redis transport
    # (kombu's "redis" extra: redis and packaging) must come with it.
    _run(python, "-m", "pip", "install", "--quiet", wheel, timeout=600)

    redis = harness.services().redis
    project = tmp_path / "site"
    (project / "proj").mkdir(parents=True)
    (project / "shop").mkdir()
    (project / "proj" / "__init__.py").write_text("from .celery import app as celery_app\n")
    (project / "proj" / "settings.py").write_text(
        SETTINGS % {"cache": redis.url(11), "broker": redis.url(12)}
    )
    (project / "proj" / "celery.py").write_text(textwrap.dedent(CELERY))
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "prices.py").write_text(textwrap.dedent(PRICES))
    (project / "shop" / "tasks.py").write_text("from shop import prices  # noqa: F401\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "PYTHON"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", C_FORCE_ROOT="1")

    worker = subprocess.Popen(
        [venv / "bin" / "celery", "-A", "proj", "worker", "--pool", "solo", "--loglevel", "INFO"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log: list[str] = []
    # Read the worker's output on a thread, so a silent worker cannot block the test.
    reader = threading.Thread(target=lambda: log.extend(iter(worker.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(
            lambda: any(" ready." in line for line in log) or worker.poll() is not None,
            "the worker to start",
            timeout=120,
            interval=0.2,
        )
        assert worker.poll() is None, "".join(log)
        assert any("django_scale.refresh" in line for line in log), "".join(log)
        web = _run(python, "-c", WEB, cwd=project, env=env, timeout=180)
        assert "checks: []" in web.stdout, web.stdout
        assert "refilled by another process" in web.stdout, web.stdout + "".join(log)
        # No warning of Python's, Celery's or Django's, but Celery's about running as root (CI).
        output = (web.stderr + "".join(log)).replace(
            "SecurityWarning: You're running the worker with superuser", ""
        )
        assert "Warning" not in output, output
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        reader.join(timeout=10)
        if worker.stdout is not None:
            worker.stdout.close()
