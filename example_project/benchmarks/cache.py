"""``bench cache``: stale-while-revalidate against django-redis, Django, django-cacheback and django-cache-memoize.

All of them run side by side in one process on the same Redis, with a real Celery worker
(threads pool, in this process) consuming from a Redis broker for the two that refill
through Celery (django-scale and django-cacheback). The cached function sleeps for 200 ms, as
a slow query or API call would. Tables:

1. **Hit overhead**: median time of a fresh hit, against a raw django-redis ``cache.get``.
2. **One stale key, 50 concurrent callers**: refill tasks enqueued and computations run.
3. **Latency under expiry**: p50/p99 of 50 concurrent callers on a key that just went stale
   (for the packages without a stale state: just expired), against the p99 of 50 concurrent
   raw ``cache.get`` hits.
4. **Cold-miss herd**: computations when 50 callers find a key missing at once.
5. **Broker down**: computations in the request path when 50 callers find a stale key and the
   broker refuses connections.
6. **Views**: a cached page hit, ``cache_page`` against ``swr_cache_page`` (time and Redis
   commands), and the refills of a stale page under 50 concurrent callers.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.cache import caches
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.urls import path
from django.views.decorators.cache import cache_page

from django_scale import metrics
from django_scale.cache import reset_state, stale_while_revalidate, swr_cache_page, wait_for_refills
from django_scale.cache.store import MARKER, Envelope, store_for

from benchmarks import print_table, time_per_call

#: Seconds the cached function takes to compute.
COMPUTE = 0.2
CALLERS = 50
CALLER_THREADS = "bench-caller"

_lock = threading.Lock()
computations: Counter[str] = Counter()
published: Counter[str] = Counter()
finished: Counter[str] = Counter()
_delay = {"seconds": COMPUTE}


#: Computations made on the callers' threads (in requests), not a worker's or the publisher's.
in_requests: Counter[str] = Counter()


def _work(name: str, n: int) -> dict[str, Any]:
    with _lock:
        computations[name] += 1
        if threading.current_thread().name.startswith(CALLER_THREADS):
            in_requests[name] += 1
    time.sleep(_delay["seconds"])
    return {"n": n, "rows": list(range(20)), "by": name}


@stale_while_revalidate(fresh=60, stale=3600)
def scale_fn(n: int) -> dict[str, Any]:
    return _work("django-scale", n)


def _cacheback() -> Any:
    from cacheback.decorators import cacheback

    @cacheback(lifetime=60, fetch_on_miss=True)
    def cacheback_fn(n: int) -> dict[str, Any]:
        return _work("django-cacheback", n)

    return cacheback_fn


def _memoize() -> Any:
    from cache_memoize import cache_memoize

    @cache_memoize(60)
    def memoize_fn(n: int) -> dict[str, Any]:
        return _work("django-cache-memoize", n)

    return memoize_fn


#: The comparison package that is not installed, if any (they are in the ``bench`` extra).
MISSING: str | None = None
cacheback_fn: Any = None
memoize_fn: Any = None
try:
    cacheback_fn = _cacheback()
    # cacheback's task re-imports the function by "module:name".
    cacheback_fn.__name__ = "cacheback_fn"
    memoize_fn = _memoize()
except ImportError as error:
    MISSING = error.name


def get_or_set_fn(n: int) -> dict[str, Any]:
    value: dict[str, Any] = caches["default"].get_or_set(f"bench:gos:{n}", lambda: _work("get_or_set", n), 60)
    return value


# -- making a key stale / missing, per package ----------------------------------------------------------


def stale_scale(n: int) -> None:
    key = scale_fn.key(n)
    store = store_for("default")
    now = time.time()
    value = {"n": n, "rows": list(range(20)), "by": "stale"}
    store.write(key, Envelope(MARKER, value, now - 120, now - 1, now + 3000), 3600, store.generation(key), "")


def stale_cacheback(n: int) -> None:
    job = cacheback_fn.job
    key = job.key(*job.prepare_args(cacheback_fn.fn, n))
    caches["default"].set(key, (time.time() - 1, {"n": n, "by": "stale"}), 3600)


def missing(n: int) -> None:
    cache = caches["default"]
    cache.delete(f"bench:gos:{n}")
    memoize_fn.invalidate(n)
    scale_fn.invalidate(n)
    job = cacheback_fn.job
    cache.delete(job.key(*job.prepare_args(cacheback_fn.fn, n)))


# -- measuring -------------------------------------------------------------------------------------------


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def concurrent_latencies(
    pool: ThreadPoolExecutor, function: Callable[[], object], callers: int
) -> list[float]:
    barrier = threading.Barrier(callers)

    def call() -> float:
        barrier.wait()
        started = time.perf_counter()
        function()
        return time.perf_counter() - started

    return [future.result(timeout=120) for future in [pool.submit(call) for _ in range(callers)]]


def warm(pool: ThreadPoolExecutor) -> None:
    """Give every caller thread its cache object and a Redis connection before measuring."""
    cache = caches["default"]
    concurrent_latencies(pool, lambda: cache.get("bench:raw"), CALLERS)


def drain(timeout: float = 60.0) -> None:
    """Wait until every refill claimed so far was published and has finished on the worker."""
    wait_for_refills(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _lock:
            if all(finished[name] >= count for name, count in published.items()):
                return
        time.sleep(0.01)
    raise RuntimeError(f"the worker did not finish the tasks: published {published}, finished {finished}")


def reset_counts() -> None:
    with _lock:
        computations.clear()
        in_requests.clear()
        published.clear()
        finished.clear()
    metrics.reset()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


# -- Celery --------------------------------------------------------------------------------------------


def _redis_url(db_offset: int) -> str:
    parts = urlsplit(os.environ["REDIS_URL"])
    db = int(parts.path.strip("/") or 0) + db_offset
    return urlunsplit(parts._replace(path=f"/{db}"))


@contextlib.contextmanager
def celery_worker() -> Iterator[Any]:
    """A Celery app on a Redis broker with a worker (threads pool) in this process."""
    from celery import Celery, _state, signals
    from celery.contrib.testing.worker import start_worker

    app = Celery("bench-cache", broker=_redis_url(1), set_as_current=True)
    # shared_task resolves the app per thread: the caller threads see the default app, which
    # the Django fixup made the (eager) newsroom app. Make this one the default meanwhile.
    previous = _state.default_app
    app.set_default()
    app.conf.task_always_eager = False
    app.conf.task_default_queue = "bench-cache"
    app.conf.broker_connection_retry_on_startup = False
    # The refill tasks are shared tasks: imported once, they register on every app.
    importlib.import_module("django_scale.tasks")
    importlib.import_module("cacheback.tasks")

    def on_publish(sender: str | None = None, **kwargs: Any) -> None:
        with _lock:
            published[str(sender)] += 1

    def on_postrun(task: Any = None, **kwargs: Any) -> None:
        with _lock:
            finished[str(task.name)] += 1

    signals.before_task_publish.connect(on_publish, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    try:
        with start_worker(app, pool="threads", concurrency=8, perform_ping_check=False, shutdown_timeout=30):
            yield app
    finally:
        signals.before_task_publish.disconnect(on_publish)
        signals.task_postrun.disconnect(on_postrun)
        _state.set_default_app(previous)
        app.pool.force_close_all()
        app.close()


@contextlib.contextmanager
def dead_broker(live: Any) -> Iterator[None]:
    from celery import Celery

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The shared tasks (already imported for the live app) register on this app as it finalizes.
    app = Celery("bench-dead", broker=f"redis://127.0.0.1:{port}/0", set_as_current=False)
    app.conf.broker_connection_retry = False
    app.set_current()
    app.set_default()
    try:
        yield
    finally:
        live.set_current()
        live.set_default()
        app.pool.force_close_all()
        app.close()


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# -- the tables --------------------------------------------------------------------------------------------


def hit_overhead(out: TextIO, quick: bool) -> None:
    cache = caches["default"]
    cache.set("bench:raw", {"n": 1, "rows": list(range(20)), "by": "raw"}, 600)
    _delay["seconds"] = 0.0
    for function in (scale_fn, cacheback_fn, memoize_fn, get_or_set_fn):
        function(1)  # warm: the entry exists and is fresh
    _delay["seconds"] = COMPUTE
    calls, repeats = (300, 3) if quick else (3000, 7)
    contenders: list[tuple[str, Callable[[], object]]] = [
        ("django-redis cache.get (raw)", lambda: cache.get("bench:raw")),
        ("Django cache.get_or_set", lambda: get_or_set_fn(1)),
        ("django-cache-memoize", lambda: memoize_fn(1)),
        ("django-cacheback", lambda: cacheback_fn(1)),
        ("django-scale stale_while_revalidate", lambda: scale_fn(1)),
    ]
    # Interleave the contenders so drift on a shared machine hits them all alike.
    samples: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(repeats):
        for name, function in contenders:
            samples[name].append(time_per_call(function, calls=calls, repeats=1))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    bests = {name: min(values) for name, values in samples.items()}
    raw, raw_best = medians["django-redis cache.get (raw)"], bests["django-redis cache.get (raw)"]
    rows = [
        (name, us(value), f"{value / raw:.2f}x", us(bests[name]), f"{bests[name] / raw_best:.2f}x")
        for name, value in medians.items()
    ]
    print_table(
        out,
        f"1. Fresh hit, per call over {repeats} runs of {calls} (goal: django-scale median <= 1.10x raw get)",
        ["", "median", "vs raw get", "best run", "vs raw get"],
        rows,
    )


def stale_window(
    out: TextIO, pool: ThreadPoolExecutor, rounds: int
) -> tuple[list[tuple[str, list[float]]], list[float]]:
    """Table 2, and the latencies table 3 needs: each case's, and raw hits' taken just before each round."""
    cases: list[tuple[str, Callable[[int], None], Callable[[int], object], str]] = [
        ("django-scale stale_while_revalidate", stale_scale, scale_fn, "django_scale.refresh"),
        ("django-cacheback", stale_cacheback, cacheback_fn, "cacheback.tasks.refresh_cache"),
        ("Django cache.get_or_set (expired)", missing, get_or_set_fn, ""),
        ("django-cache-memoize (expired)", missing, memoize_fn, ""),
    ]
    rows = []
    latencies = []
    hits: list[float] = []
    cache = caches["default"]
    cache.set("bench:raw", {"n": 1}, 600)
    for name, make, function, task in cases:
        enqueued, computed, all_samples = [], [], []
        for round_number in range(rounds):
            n = 1000 + round_number
            make(n)
            warm(pool)
            # The baseline: 50 concurrent raw hits under the same conditions, just before.
            hits += concurrent_latencies(pool, lambda: cache.get("bench:raw"), CALLERS)
            reset_counts()
            all_samples += concurrent_latencies(pool, lambda function=function, n=n: function(n), CALLERS)
            drain()
            with _lock:
                enqueued.append(published[task] if task else 0)
                computed.append(sum(computations.values()))
        latencies.append((name, all_samples))
        rows.append(
            (
                name,
                "/".join(str(count) for count in enqueued) if task else "-",
                "/".join(str(count) for count in computed),
            )
        )
    print_table(
        out,
        f"2. One stale key, {CALLERS} concurrent callers, per round (goal: django-scale enqueues exactly 1)",
        ["", "refill tasks enqueued", "computations"],
        rows,
    )
    return latencies, hits


def latency_under_expiry(
    out: TextIO, latencies: list[tuple[str, list[float]]], hits: list[float], rounds: int
) -> None:
    hit_p99 = percentile(hits, 0.99)
    rows = [
        (f"raw cache.get hit (baseline, {len(hits)} calls)", ms(percentile(hits, 0.5)), ms(hit_p99), "1.00x")
    ]
    for name, samples in latencies:
        p99 = percentile(samples, 0.99)
        rows.append((name, ms(percentile(samples, 0.5)), ms(p99), f"{p99 / hit_p99:.2f}x"))
    print_table(
        out,
        f"3. Latency of {CALLERS} concurrent callers on a key that just expired, 200 ms function, "
        f"{rounds * CALLERS} calls (goal: django-scale p99 <= 1.5x a hit's p99)",
        ["", "p50", "p99", "p99 vs hit p99"],
        rows,
    )


def cold_herd(out: TextIO, pool: ThreadPoolExecutor) -> None:
    cases: list[tuple[str, Callable[[int], object]]] = [
        ("Django cache.get_or_set", get_or_set_fn),
        ("django-cache-memoize", memoize_fn),
        ("django-cacheback (fetch_on_miss)", cacheback_fn),
        ("django-scale stale_while_revalidate", scale_fn),
    ]
    rows = []
    for index, (name, function) in enumerate(cases):
        n = 5000 + index
        missing(n)
        warm(pool)
        reset_counts()
        samples = concurrent_latencies(pool, lambda function=function, n=n: function(n), CALLERS)
        drain()
        rows.append((name, sum(computations.values()), ms(percentile(samples, 0.5)), ms(max(samples))))
    print_table(
        out,
        f"4. Cold-miss herd: {CALLERS} concurrent callers, key missing (goal: django-scale computes once)",
        ["", "computations", "p50", "max"],
        rows,
    )


def broker_down(out: TextIO, pool: ThreadPoolExecutor, live: Any) -> None:
    rows = []
    cases: list[tuple[str, Callable[[int], None], Callable[[int], object]]] = [
        ("django-cacheback", stale_cacheback, cacheback_fn),
        ("django-scale stale_while_revalidate", stale_scale, scale_fn),
    ]
    for index, (name, make, function) in enumerate(cases):
        n = 7000 + index
        make(n)
        warm(pool)
        reset_counts()
        reset_state()
        # cacheback logs a traceback per failed enqueue; the count is what matters here.
        with dead_broker(live), quiet("cacheback", "django_scale.cache"):
            samples = concurrent_latencies(pool, lambda function=function, n=n: function(n), CALLERS)
            # django-scale computes off the request (the publisher thread): wait for it to count it.
            wait_for_refills(30)
        rows.append(
            (
                name,
                sum(in_requests.values()),
                sum(computations.values()),
                ms(percentile(samples, 0.5)),
                ms(percentile(samples, 0.99)),
            )
        )
    reset_state()
    print_table(
        out,
        f"5. Broker down (connection refused, default transport options): {CALLERS} concurrent callers on a stale key",
        ["", "computations in requests", "computations in all", "p50", "p99"],
        rows,
    )


@cache_page(60)
def stock_page(request: HttpRequest) -> HttpResponse:
    return HttpResponse("x" * 2000)


@swr_cache_page(60, 3600)
def swr_page(request: HttpRequest) -> HttpResponse:
    with _lock:
        computations["page"] += 1
    return HttpResponse("x" * 2000)


#: The URLconf of table 6: a Celery refill renders the page through the project's WSGI stack.
urlpatterns = [path("bench/swr/", swr_page)]
SCALE_MIDDLEWARE = "django_scale.middleware.ScaleMiddleware"


def redis_commands() -> int:
    """How many commands the Redis server has run (INFO itself not counted)."""
    stats = caches["default"].client.get_client().info("commandstats")  # type: ignore[attr-defined]
    return sum(int(stat["calls"]) for name, stat in stats.items() if name != "cmdstat_info")


def views(out: TextIO, pool: ThreadPoolExecutor, quick: bool) -> None:
    """Table 6: a page hit's time and Redis commands, and the refills of a stale page."""
    from django.test.utils import override_settings

    from django_scale.middleware import ScaleMiddleware

    factory = RequestFactory(SERVER_NAME="localhost")
    rest = [entry for entry in settings.MIDDLEWARE if entry != SCALE_MIDDLEWARE]
    # swr_cache_page needs ScaleMiddleware first in MIDDLEWARE, which judges the final response.
    with override_settings(ROOT_URLCONF="benchmarks.cache", MIDDLEWARE=[SCALE_MIDDLEWARE, *rest]):
        swr = ScaleMiddleware(swr_page)
        stock_page(factory.get("/bench/stock/"))
        swr(factory.get("/bench/swr/"))
        calls, repeats = (200, 3) if quick else (2000, 5)
        stock = time_per_call(lambda: stock_page(factory.get("/bench/stock/")), calls=calls, repeats=repeats)
        scale = time_per_call(lambda: swr(factory.get("/bench/swr/")), calls=calls, repeats=repeats)
        per_hit = {}
        for name, view in (("stock", stock_page), ("scale", swr)):
            before = redis_commands()
            for _ in range(calls):
                view(factory.get(f"/bench/{'swr' if name == 'scale' else 'stock'}/"))
            per_hit[name] = (redis_commands() - before) / calls
        # A stale page, 50 concurrent callers: one refill, rendered by the worker through the stack.
        key = swr_page._django_scale_page.key(factory.get("/bench/swr/"), (), {})  # type: ignore[attr-defined]
        store = store_for("default")
        envelope = store.get(key)
        assert envelope is not None, "the page was not stored"
        store.write(key, envelope._replace(fresh_until=time.time() - 1), 3600, store.generation(key), "")
        reset_counts()
        concurrent_latencies(pool, lambda: swr(factory.get("/bench/swr/")), CALLERS)
        drain()
        with _lock:
            enqueued, renders = published["django_scale.refresh"], computations["page"]
        stored = metrics.snapshot().get("swr.refill.succeeded", 0)
    print_table(
        out,
        "6. Cached page hit (RequestFactory request, 2 kB body; swr_cache_page under ScaleMiddleware), "
        "median per call",
        ["", "time", "vs cache_page", "Redis commands per hit"],
        [
            ("Django cache_page", us(stock), "1.00x", f"{per_hit['stock']:.2f}"),
            (
                "ScaleMiddleware + swr_cache_page",
                us(scale),
                f"{scale / stock:.2f}x",
                f"{per_hit['scale']:.2f}",
            ),
        ],
    )
    out.write(
        f"   stale page, {CALLERS} concurrent callers: {enqueued} refill task(s) enqueued, "
        f"{renders} rendering(s), {stored} stored (goal: exactly 1 of each)\n"
    )


def run(out: TextIO, quick: bool = False) -> None:
    backend = settings.CACHES["default"]["BACKEND"]
    if "django_redis" not in backend or "REDIS_URL" not in os.environ:
        out.write("bench cache needs Redis: set REDIS_URL or DJANGO_SCALE_EXAMPLE_HARNESS=1.\n")
        return
    if MISSING:
        out.write(
            f"bench cache compares with {MISSING}, which is not installed: pip install -e '.[bench]'.\n"
        )
        return
    caches["default"].clear()
    rounds = 1 if quick else 3
    out.write(
        f"function: {COMPUTE * 1000:.0f} ms; {CALLERS} concurrent callers; Celery worker: threads pool, "
        f"8 threads, Redis broker; {rounds} round(s) per scenario\n"
    )
    hit_overhead(out, quick)
    with celery_worker() as app, ThreadPoolExecutor(CALLERS, thread_name_prefix=CALLER_THREADS) as pool:
        latencies, hits = stale_window(out, pool, rounds)
        latency_under_expiry(out, latencies, hits, rounds)
        cold_herd(out, pool)
        broker_down(out, pool, app)
        views(out, pool, quick)
    caches["default"].clear()
