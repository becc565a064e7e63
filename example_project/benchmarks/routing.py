"""``bench routing``: router overhead, and where reads go under a mixed workload with lag.

Compared side by side in one run:

* stock Django: no router, every query on the primary;
* django-multidb-router (``multidb.PinningReplicaRouter`` + ``PinningRouterMiddleware``): a
  thread-local pin and an unsigned cookie that keep a user on the primary for 15 s after any
  POST;
* django-scale (``ReplicaRouter`` + ``ScaleMiddleware``): the user's WAL position in a
  signed cookie; reads go to a replica once it has replayed it.

The workload is real requests through Django's test client against the configured primary
and streaming replica. Lag is injected on the standby with ``recovery_min_apply_delay``.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from django.conf import settings
from django.db import connections
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.test import Client
from django.test.utils import override_settings
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from django_scale.replicas import monitor, routing_state
from django_scale.routers import ReplicaRouter
from django_scale.testing import override_scale_settings

from benchmarks import print_table, require_replica, time_per_call

USERS_ROW_PREFIX = "bench-routing-user-"


# -- The views the workload calls (a urlconf of their own) ---------------------------------


@csrf_exempt
def write(request: HttpRequest, pk: int) -> JsonResponse:
    from news.models import Article

    Article.objects.filter(pk=pk).update(views=F("views") + 1)
    # Read back in the same request, as a page that shows what was just saved does.
    value = Article.objects.filter(pk=pk).values_list("views", flat=True).get()
    return JsonResponse({"value": value})


def read(request: HttpRequest, pk: int) -> JsonResponse:
    from news.models import Article

    queryset = Article.objects.filter(pk=pk)
    alias = queryset.db  # the routing decision, made once
    value = queryset.using(alias).values_list("views", flat=True).get()
    return JsonResponse({"alias": alias, "value": value})


urlpatterns = [path("write/<int:pk>/", write), path("read/<int:pk>/", read)]


# -- Setups ----------------------------------------------------------------------------------


def _middleware_without(*paths: str) -> list[str]:
    return [entry for entry in settings.MIDDLEWARE if entry not in paths]


SCALE_MIDDLEWARE = "django_scale.middleware.ScaleMiddleware"
MULTIDB_MIDDLEWARE = "multidb.middleware.PinningRouterMiddleware"


def setups(replica: str) -> dict[str, dict[str, Any]]:
    """The settings of each contender."""
    base = _middleware_without(SCALE_MIDDLEWARE, MULTIDB_MIDDLEWARE)
    return {
        "stock Django (no router)": {"DATABASE_ROUTERS": [], "MIDDLEWARE": base},
        "django-multidb-router 15 s pin": {
            "DATABASE_ROUTERS": ["multidb.PinningReplicaRouter"],
            "MIDDLEWARE": [MULTIDB_MIDDLEWARE, *base],
            "REPLICA_DATABASES": [replica],
            "MULTIDB_PINNING_SECONDS": 15,
        },
        "django-scale ReplicaRouter": {
            "DATABASE_ROUTERS": ["django_scale.routers.ReplicaRouter"],
            "MIDDLEWARE": [SCALE_MIDDLEWARE, *base],
        },
        # Past MAX_REPLICA_LAG the replica is ejected; with a cap, reads that need no recent
        # write of their user stay on it (stale, but no writer's own write is missed).
        "django-scale, PRIMARY_FALLBACK_CAP=0.1": {
            "DATABASE_ROUTERS": ["django_scale.routers.ReplicaRouter"],
            "MIDDLEWARE": [SCALE_MIDDLEWARE, *base],
            "DJANGO_SCALE": {**settings.DJANGO_SCALE, "PRIMARY_FALLBACK_CAP": 0.1},
        },
    }


def _reset_multidb() -> None:
    # multidb caches its replica list in a module global on first use.
    import multidb

    multidb.replicas = None


# -- Part 1: the cost of one routing decision -------------------------------------------------


def decision_overhead(out: TextIO, replica: str, quick: bool) -> None:
    from django.db.utils import ConnectionRouter
    from multidb import PinningReplicaRouter

    from news.models import Article

    calls = 20_000 if quick else 200_000
    stock = ConnectionRouter([])
    multidb_router = ConnectionRouter([PinningReplicaRouter()])
    scale = ConnectionRouter([ReplicaRouter()])
    _reset_multidb()
    with override_settings(REPLICA_DATABASES=[replica]), routing_state():
        # Steady state inside a request: the replica is chosen and its connection open.
        assert scale.db_for_read(Article) == replica, "the replica is not available; is it running?"
        timings = {
            "stock Django (no router)": time_per_call(lambda: stock.db_for_read(Article), calls=calls),
            "django-multidb-router": time_per_call(lambda: multidb_router.db_for_read(Article), calls=calls),
            "django-scale ReplicaRouter": time_per_call(lambda: scale.db_for_read(Article), calls=calls),
        }
    base = timings["stock Django (no router)"]
    other = timings["django-multidb-router"]
    print_table(
        out,
        f"Routing decision: time per db_for_read() ({calls:,} calls, median of 5)",
        ["router", "µs/decision", "vs stock", "vs multidb"],
        [
            [name, f"{seconds * 1e6:.2f}", f"{seconds / base:.1f}x", f"{seconds / other:.2f}x"]
            for name, seconds in timings.items()
        ],
    )


# -- Part 2: a mixed workload at injected lags ----------------------------------------------------


@dataclass
class User:
    client: Client
    row: int
    written: int = 0
    #: When each cookie expires. Django's test client keeps cookies forever; a browser drops
    #: them at max-age, which is what time-based pinning relies on.
    expires: dict[str, float] = field(default_factory=dict)

    def request(self, method: str, url: str) -> Any:
        now = time.monotonic()
        for name, at in list(self.expires.items()):
            if at <= now:
                self.client.cookies.pop(name, None)
                del self.expires[name]
        response = getattr(self.client, method)(url)
        for name, morsel in response.cookies.items():
            if morsel["max-age"] != "":
                self.expires[name] = now + int(morsel["max-age"])
        return response


@dataclass
class Outcome:
    reads: Counter[str] = field(default_factory=Counter)
    stale_own: int = 0
    own_reads: int = 0
    requests: int = 0


@contextmanager
def injected_lag(replica: str, seconds: float) -> Iterator[None]:
    """Delay replay on the standby by *seconds* (``recovery_min_apply_delay``), then undo it."""

    def set_delay(value: str) -> None:
        with connections[replica].cursor() as cursor:
            cursor.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = '{value}'")
            cursor.execute("SELECT pg_reload_conf()")

    set_delay(f"{int(seconds * 1000)}ms")
    time.sleep(0.2)
    try:
        yield
    finally:
        set_delay("0")
        time.sleep(0.2)


def workload(rows: list[int], duration: float, think: float, seed: int) -> Outcome:
    """Run users who each act every ~*think* seconds for *duration* seconds."""
    rng = random.Random(seed)
    users = [User(Client(), row) for row in rows]
    start = time.monotonic()
    queue = [(start + rng.uniform(0, think), n) for n in range(len(users))]
    heapq.heapify(queue)
    outcome = Outcome()

    def read_row(user: User, row: int) -> None:
        body = user.request("get", f"/read/{row}/").json()
        outcome.requests += 1
        outcome.reads[body["alias"]] += 1
        if row == user.row:
            outcome.own_reads += 1
            if body["value"] < user.written:
                outcome.stale_own += 1

    while queue:
        at, n = heapq.heappop(queue)
        if at > start + duration:
            break
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        user = users[n]
        if rng.random() < 0.1:
            # A write, then the page that shows it: the read that must never be stale.
            user.written = user.request("post", f"/write/{user.row}/").json()["value"]
            outcome.requests += 1
            read_row(user, user.row)
        else:
            read_row(user, user.row if rng.random() < 0.5 else rng.choice(rows))
        heapq.heappush(queue, (at + rng.expovariate(1 / think), n))
    return outcome


def mixed_workload(out: TextIO, replica: str, quick: bool) -> None:
    from news.models import Article, Author, Section

    users, think = (40, 1.0) if quick else (100, 2.0)
    duration = 4.0 if quick else 12.0
    # The last full-run lag is past multidb's 15 s pin and django-scale's MAX_REPLICA_LAG.
    lags = [0.0, 0.1, 1.0] if quick else [0.0, 0.1, 0.5, 2.0, 20.0]
    section, _ = Section.objects.get_or_create(slug="bench-routing", defaults={"name": "Bench"})
    author, _ = Author.objects.get_or_create(name="Bench user")
    Article.objects.filter(slug__startswith=USERS_ROW_PREFIX).delete()
    rows = [
        Article.objects.create(
            section=section, author=author, title=f"Bench {n}", slug=f"{USERS_ROW_PREFIX}{n}", body="."
        ).pk
        for n in range(users)
    ]
    results = []
    try:
        for lag in lags:
            with injected_lag(replica, lag):
                for name, options in setups(replica).items():
                    _reset_multidb()
                    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], **options):
                        # Long enough for reads later than the lag after a write to happen.
                        outcome = workload(rows, max(duration, lag + 10), think, seed=7)
                    total = sum(outcome.reads.values())
                    share = outcome.reads[replica] / total if total else 0.0
                    results.append([f"{lag * 1000:.0f} ms", name, total, f"{share:.1%}", outcome.stale_own])
    finally:
        Article.objects.filter(slug__startswith=USERS_ROW_PREFIX).delete()
    print_table(
        out,
        f"Mixed workload: {users} users acting every ~{think:g} s for {duration:g} s (lag + 10 s at least) per cell; "
        "90% reads, 10% writes each followed by a read of the written row",
        ["injected lag", "setup", "reads", "on replica", "stale after own write"],
        results,
    )


# -- Part 3: two replicas, one lagging -----------------------------------------------------------


def two_replicas(out: TextIO, replica: str, quick: bool) -> None:
    """The mixed workload with replay delayed on *replica* and not on ``replica2``."""
    from news.models import Article, Author, Section

    if "replica2" not in settings.DATABASES:
        out.write("\n(2 replicas, one lagging: skipped, no replica2 alias; set REPLICA2_URL)\n")
        return
    both = [replica, "replica2"]
    users, think, duration, lag = (40, 1.0, 4.0, 2.0) if quick else (100, 2.0, 12.0, 2.0)
    section, _ = Section.objects.get_or_create(slug="bench-routing", defaults={"name": "Bench"})
    author, _ = Author.objects.get_or_create(name="Bench user")
    Article.objects.filter(slug__startswith=USERS_ROW_PREFIX).delete()
    rows = [
        Article.objects.create(
            section=section, author=author, title=f"Bench {n}", slug=f"{USERS_ROW_PREFIX}{n}", body="."
        ).pk
        for n in range(users)
    ]
    base = _middleware_without(SCALE_MIDDLEWARE, MULTIDB_MIDDLEWARE)
    scale = {
        "DATABASE_ROUTERS": ["django_scale.routers.ReplicaRouter"],
        "MIDDLEWARE": [SCALE_MIDDLEWARE, *base],
    }
    contenders: dict[str, dict[str, Any]] = {
        "django-multidb-router 15 s pin": {
            "DATABASE_ROUTERS": ["multidb.PinningReplicaRouter"],
            "MIDDLEWARE": [MULTIDB_MIDDLEWARE, *base],
            "REPLICA_DATABASES": both,
            "MULTIDB_PINNING_SECONDS": 15,
        },
        "django-scale, REPLICA_POLICY=random": {**scale, "DJANGO_SCALE": {"REPLICA_POLICY": "random"}},
        "django-scale, REPLICA_POLICY=least_lag": {**scale, "DJANGO_SCALE": {"REPLICA_POLICY": "least_lag"}},
    }
    results = []
    try:
        with injected_lag(replica, lag):
            for name, options in contenders.items():
                _reset_multidb()
                scale_settings = {
                    **settings.DJANGO_SCALE,
                    "REPLICAS": both,
                    **options.pop("DJANGO_SCALE", {}),
                }
                with override_settings(
                    ROOT_URLCONF=__name__,
                    ALLOWED_HOSTS=["testserver"],
                    DJANGO_SCALE=scale_settings,
                    **options,
                ):
                    for alias in both:
                        monitor(alias).is_available()
                    outcome = workload(rows, duration, think, seed=11)
                total = sum(outcome.reads.values()) or 1
                results.append(
                    [
                        name,
                        total,
                        f"{outcome.reads[replica] / total:.1%}",
                        f"{outcome.reads['replica2'] / total:.1%}",
                        f"{outcome.reads['default'] / total:.1%}",
                        outcome.stale_own,
                    ]
                )
    finally:
        Article.objects.filter(slug__startswith=USERS_ROW_PREFIX).delete()
    print_table(
        out,
        f"2 replicas, one lagging: replay on {replica!r} delayed {lag:g} s, 'replica2' caught up; "
        f"{users} users for {duration:g} s",
        ["setup", "reads", f"on {replica} (lagging)", "on replica2", "on primary", "stale after own write"],
        results,
    )


# -- Part 4: probes per replica against the number of worker processes ----------------------------

WORKER = """
import json, sys, time
import django
django.setup()
from django_scale.replicas import monitor
from django_scale.testing import override_scale_settings
seconds, shared, directory = float(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
with override_scale_settings(SHARED_HEALTH=shared, SHARED_HEALTH_DIR=directory, HEALTH_CHECK_INTERVAL=0.1):
    item = monitor("replica")
    item.is_available()
    print("ready", flush=True)
    sys.stdin.readline()  # every worker starts measuring when all are ready
    probes = item.probes
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        item.is_available()
        time.sleep(0.01)
    print(json.dumps({"probes": item.probes - probes, "connected": item._connection is not None}), flush=True)
    sys.stdin.readline()  # and exits when all are done, so the prober outlives the window
"""


def worker_processes(out: TextIO, quick: bool) -> None:
    """Probe connections and probes per second per replica, with 1, 4 and 16 worker processes."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    seconds = 2.0 if quick else 5.0
    counts = [1, 16] if quick else [1, 4, 16]
    env = {**os.environ, "DJANGO_SCALE_EXAMPLE_HARNESS": "0", "PYTHONPATH": str(Path(settings.BASE_DIR))}
    results = []
    for shared in (False, True):
        for count in counts:
            with tempfile.TemporaryDirectory(prefix="bench-routing-") as directory:
                workers = [
                    subprocess.Popen(
                        [sys.executable, "-c", WORKER, str(seconds), "1" if shared else "0", directory],
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(count)
                ]
                reports = []
                try:
                    for worker in workers:
                        assert worker.stdout is not None
                        if worker.stdout.readline().strip() != "ready":
                            raise RuntimeError(f"a benchmark worker failed:\n{worker.communicate()[1]}")
                    for step in ("go", "done"):
                        for worker in workers:
                            assert worker.stdin is not None
                            worker.stdin.write(f"{step}\n")
                            worker.stdin.flush()
                        if step == "go":
                            for worker in workers:
                                assert worker.stdout is not None
                                reports.append(json.loads(worker.stdout.readline()))
                finally:
                    for worker in workers:
                        worker.communicate(timeout=300)
            probes = sum(report["probes"] for report in reports)
            connections_open = sum(report["connected"] for report in reports)
            results.append(
                [
                    "django-scale, SHARED_HEALTH=True" if shared else "per process (SHARED_HEALTH=False)",
                    count,
                    connections_open,
                    f"{probes / seconds:.1f}",
                ]
            )
    print_table(
        out,
        f"Worker processes on one host: probes of one replica over {seconds:g} s, HEALTH_CHECK_INTERVAL=0.1 "
        "(goal: independent of workers)",
        ["health", "workers", "probe connections", "probes/s per replica"],
        results,
    )


def run(out: TextIO, quick: bool = False) -> None:
    replica = require_replica(out, "routing")
    with override_scale_settings(HEALTH_CHECK_INTERVAL=0.1):
        monitor(replica).is_available()
        decision_overhead(out, replica, quick)
        mixed_workload(out, replica, quick)
        two_replicas(out, replica, quick)
    worker_processes(out, quick)
