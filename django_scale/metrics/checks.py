"""System checks of request metrics (``MetricsMiddleware``): ids E508 and W510, run by ``check_ops``.

W509 (``MetricsMiddleware`` before ``ScaleMiddleware``) is retired: that is now the place.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.core import checks

from django_scale.checks import _message, _setting
from django_scale.conf import conf

__all__ = ["check_metrics"]

METRICS_MIDDLEWARE = "django_scale.metrics.MetricsMiddleware"
SCALE_MIDDLEWARE = "django_scale.middleware.ScaleMiddleware"


def _e508_metrics_dir_unusable(directory: str, problem: str) -> checks.CheckMessage:
    return _message(
        checks.Error,
        "django_scale.E508",
        f"MetricsMiddleware cannot keep its shared metrics file in {directory!r}: {problem}.",
        "Set DJANGO_SCALE['METRICS_DIR'] to a directory the web workers can create and write, "
        "on a local file system (a tmpfs such as /run or /dev/shm is best).",
        obj=_setting("METRICS_DIR"),
    )


def _w510_metrics_after_scale_middleware() -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W510",
        "MetricsMiddleware comes after ScaleMiddleware in MIDDLEWARE: the latency it records "
        "leaves out ScaleMiddleware's work (the wait for a replica that has the user's last "
        "write, the write position read after a write), and a request run again after a "
        "replica failed is recorded twice.",
        f"Put {METRICS_MIDDLEWARE!r} first in MIDDLEWARE, right before {SCALE_MIDDLEWARE!r}.",
        obj="MIDDLEWARE",
    )


def check_metrics() -> list[checks.CheckMessage]:
    """Check request metrics, when ``MetricsMiddleware`` is installed: its file and its place."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or ())
    if METRICS_MIDDLEWARE not in middleware:
        return []
    messages: list[checks.CheckMessage] = []
    if SCALE_MIDDLEWARE in middleware and middleware.index(METRICS_MIDDLEWARE) > middleware.index(
        SCALE_MIDDLEWARE
    ):
        messages.append(_w510_metrics_after_scale_middleware())
    try:
        directory = conf.metrics_options()[0]
    except Exception:  # a wrong METRICS_* value: check_settings reports it
        return messages
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        messages.append(_e508_metrics_dir_unusable(directory, error.strerror or str(error)))
        return messages
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        messages.append(_e508_metrics_dir_unusable(directory, "it is not a writable directory"))
    return messages
