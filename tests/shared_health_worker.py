"""A worker process for tests/test_replicas_shared.py: asks for the replica's health for a while.

Usage: ``python shared_health_worker.py SECONDS SHARED_HEALTH_DIR [HUNG_REDIS_PORT]``. With a
port, ``CACHE_ALIAS`` (where the monitors share ejections) is a Redis there that accepts and
never answers. Prints ``ready`` once its
monitor has started, waits for a line on stdin (so every worker measures the same window), and
prints what its monitor did in the window, as JSON: its own probes, the shared records it
copied, whether it holds a probe connection, and how often the replica was available to its
routing decisions. It then waits for another line before exiting, so that the host's prober
outlives every other worker's window.
"""

from __future__ import annotations

import json
import os
import sys
import time

import django

django.setup()

from django.test.utils import override_settings  # noqa: E402

from django_scale.replicas import monitor  # noqa: E402
from django_scale.testing import override_scale_settings  # noqa: E402

seconds, directory = float(sys.argv[1]), sys.argv[2]
hung = sys.argv[3] if len(sys.argv) > 3 else ""
caches: dict[str, object] = {}
scale: dict[str, object] = {}
if hung:
    from django.conf import settings

    caches = {
        "CACHES": {
            **settings.CACHES,
            "hung": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": f"redis://127.0.0.1:{hung}/0",
                # "Never answers": the call blocks for the hour.
                "OPTIONS": {"SOCKET_TIMEOUT": 3600},
            },
        }
    }
    scale = {"CACHE_ALIAS": "hung", "CACHE_RETRY_AFTER": 60}
with (
    override_settings(**caches),
    override_scale_settings(SHARED_HEALTH_DIR=directory, HEALTH_CHECK_INTERVAL=0.1, **scale),
):
    item = monitor("replica")
    item.is_available()
    print("ready", flush=True)
    sys.stdin.readline()
    probes, shared_reads = item.probes, item.shared_reads
    asked = available = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        asked += 1
        available += item.is_available()
        time.sleep(0.01)
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "probes": item.probes - probes,
                "shared_reads": item.shared_reads - shared_reads,
                "connected": item._connection is not None,
                "asked": asked,
                "available": available,
            }
        ),
        flush=True,
    )
    sys.stdin.readline()
    if hung:
        # A thread is stuck on the hung server for the hour: leave without joining it.
        os._exit(0)
