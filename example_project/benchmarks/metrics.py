"""``bench metrics``: what request monitoring costs, how right its percentiles are, how it scales.

Three parts, side by side in one run:

* **Overhead per request**: a one-query view through Django's test client with no
  monitoring, with ``django_scale.metrics.MetricsMiddleware`` (latency, DB time and query
  count per alias, status, events: about six recorded values per request) and with
  django-prometheus's ``PrometheusBeforeMiddleware`` / ``PrometheusAfterMiddleware`` (its
  request metrics; its DB metrics need its own database backends, not installed here). The
  setups take turns in round-robin batches; the table gives medians and microseconds over
  no monitoring. A second table times one recorded value in the store alone.
* **Accuracy** and **scale** (:mod:`benchmarks.metrics_scale`): merged percentiles against
  exact ones and django-prometheus's ``histogram_quantile()``; the export after 1,000 recycled
  workers and over a full 5-minute window, with the file's size and exact totals.
* **Instructions**: under callgrind (when valgrind is installed), each setup around a view and
  the full-window export, in CPU instructions: figures a busy machine does not blur.

It ends with the issue's goals, each marked met or not.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.test.utils import override_settings
from django.urls import path

from django_scale import metrics
from django_scale.metrics.recording import disable
from django_scale.metrics.sketch import bucket_of
from django_scale.metrics.store import SlotStore
from django_scale.testing import override_scale_settings

from benchmarks import print_table, rerun_under_callgrind
from benchmarks.metrics_scale import accuracy, export_full_window, full_window, met, scale

NONE = "no monitoring"
SCALE = "django-scale MetricsMiddleware"
PROMETHEUS = "django-prometheus middleware"
PROMETHEUS_MIDDLEWARE = (
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
)


@contextlib.contextmanager
def without_timing_wrapper(without: bool = True) -> Iterator[None]:
    """Take MetricsMiddleware's execute wrapper off this thread's connections (when *without*).

    Once a MetricsMiddleware is built, every connection runs its wrapper for every query,
    inside a recorded request or not: a setup without the middleware measured with the
    wrapper on would pay Django's execute-wrapper protocol and the wrapper's early return
    (about 3,000 instructions per query), and the middleware's overhead would look that
    much smaller. The wrapper goes back on afterwards, as a worker's middleware puts it.
    """
    if not without:
        yield
        return
    disable()
    try:
        yield
    finally:
        metrics.MetricsMiddleware(lambda request: HttpResponse(""))


def one_query(request: HttpRequest, pk: int) -> HttpResponse:
    from news.models import Section

    return HttpResponse(str(Section.objects.filter(pk__gte=pk).count()))


urlpatterns = [path("sections/<int:pk>/", one_query, name="sections")]


# -- Overhead -------------------------------------------------------------------------------------


def _setups(directory: str) -> dict[str, dict[str, Any]]:
    base = list(settings.MIDDLEWARE)
    common = {"ROOT_URLCONF": __name__, "ALLOWED_HOSTS": ["testserver"], "DEBUG": False}
    return {
        NONE: {**common, "MIDDLEWARE": base},
        SCALE: {**common, "MIDDLEWARE": ["django_scale.metrics.MetricsMiddleware", *base]},
        PROMETHEUS: {
            **common,
            "MIDDLEWARE": [PROMETHEUS_MIDDLEWARE[0], *base, PROMETHEUS_MIDDLEWARE[1]],
        },
    }


def overhead(
    out: TextIO, quick: bool, directory: str, goals: list[list[str]], figures: dict[str, float]
) -> None:
    setups = _setups(directory)
    rounds, per_batch = (5, 100) if quick else (20, 250)
    clients: dict[str, Client] = {}
    # Per setup, per round: (median wall seconds, median CPU seconds of this thread) per request.
    # A sync request and its queries run in this thread; CPU time is what a busy machine
    # distorts least (wall time there includes waiting for a core).
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    with override_scale_settings(METRICS_DIR=directory):
        for name, config in setups.items():
            with override_settings(**config):
                client = clients[name] = Client()
                for pk in range(20):
                    assert client.get(f"/sections/{pk}/").status_code == 200
        names = list(setups)
        for batch in range(rounds):
            shift = batch % len(names)
            for name in names[shift:] + names[:shift]:
                with override_settings(**setups[name]), without_timing_wrapper(name != SCALE):
                    get = clients[name].get
                    walls, cpus = [], []
                    for index in range(per_batch):
                        started, cpu = time.perf_counter(), time.thread_time()
                        get(f"/sections/{index % 50}/")
                        cpus.append(time.thread_time() - cpu)
                        walls.append(time.perf_counter() - started)
                    samples[name].append((statistics.median(walls), statistics.median(cpus)))
            gc.collect()
        recorded = metrics.local_snapshot().totals
    disable()
    stock_wall = statistics.median(s[0] for s in samples[NONE])
    stock_cpu = statistics.median(s[1] for s in samples[NONE])
    rows = []
    for name in setups:
        wall = statistics.median(s[0] for s in samples[name])
        cpu = statistics.median(s[1] for s in samples[name])
        # Paired per round: against the same round's stock median, so machine noise cancels.
        extra = statistics.median(s[1] - n[1] for s, n in zip(samples[name], samples[NONE], strict=True))
        rows.append(
            [
                name,
                f"{wall * 1e6:.0f}",
                f"{wall / stock_wall:.3f}",
                f"{cpu * 1e6:.0f}",
                f"{cpu / stock_cpu:.3f}",
                f"{extra * 1e6:+.1f}",
            ]
        )
    print_table(
        out,
        "Overhead per request (one-query view, test client; median of per-round medians)",
        ["setup", "wall µs", "× none", "CPU µs", "× none", "CPU µs over none"],
        rows,
    )
    count = recorded.get("request\x1fsections\x1fGET", (0, 0.0))[0]
    out.write(f"  (MetricsMiddleware recorded {count} requests of the route 'sections' in one series)\n")

    isolated(out, directory, goals, figures)

    store = SlotStore(directory, 4, 64, 1)
    one = [("request\x1fr\x1fGET", bucket_of(0.012), 0.012)]
    five = [(f"request\x1fr{i}\x1fGET", bucket_of(0.012), 0.012) for i in range(5)]
    store.record(five, [("requests\x1fr\x1fGET\x1f2xx", 1)])
    empty = cpu_per_call(lambda: store.record((), ()), calls=20_000)
    single = cpu_per_call(lambda: store.record(one, ()), calls=20_000)
    many = cpu_per_call(lambda: store.record(five, ()), calls=20_000)
    counter = cpu_per_call(lambda: store.record((), [("requests\x1fr\x1fGET\x1f2xx", 1)]), calls=20_000)
    bucket = cpu_per_call(lambda: bucket_of(0.0123), calls=100_000)
    print_table(
        out,
        "CPU cost of one recorded value in the shared store (goal <= 3 µs; median of 5 runs)",
        ["what", "µs"],
        [
            ["one call, nothing recorded (lock, slot)", f"{empty * 1e6:.2f}"],
            ["one timing value (bucket, count, sum, running counts)", f"{(many - empty) / 5 * 1e6:.2f}"],
            ["one call with one timing value", f"{single * 1e6:.2f}"],
            ["one counter increment", f"{(counter - empty) * 1e6:.2f}"],
            ["bucket_of() alone", f"{bucket * 1e6:.2f}"],
        ],
    )
    store.release()
    per_value = max((many - empty) / 5, counter - empty) * 1e6
    goals.append(
        [
            "one recorded value (CPU µs, the dearer of timing and counter)",
            f"{per_value:.2f} µs",
            "<= 3 µs",
            met(per_value <= 3),
        ]
    )


def isolated_setups() -> tuple[HttpRequest, dict[str, dict[str, Callable[[HttpRequest], Any]]]]:
    """Return a request and, per view (no query, 1, 10 queries), the view bare and inside each middleware."""
    from django.db import connection
    from django.test import RequestFactory
    from django.urls import resolve

    def no_query(request: HttpRequest) -> HttpResponse:
        return HttpResponse("")

    def queries(n: int) -> Callable[[HttpRequest], HttpResponse]:
        def view(request: HttpRequest) -> HttpResponse:
            with connection.cursor() as cursor:
                for _ in range(n):
                    cursor.execute("SELECT 1")
            return HttpResponse("")

        return view

    from django_prometheus.middleware import PrometheusAfterMiddleware, PrometheusBeforeMiddleware

    request = RequestFactory().get("/sections/1/")
    request.resolver_match = resolve("/sections/1/", urlconf=__name__)
    return request, {
        label: {
            "bare": view,
            "scale": metrics.MetricsMiddleware(view),
            "prometheus": PrometheusBeforeMiddleware(PrometheusAfterMiddleware(view)),
        }
        for label, view in (("no query", no_query), ("1 query", queries(1)), (TEN, queries(10)))
    }


TEN = "10 queries"
#: Turns of the isolated setups; in each, blocks of each setup take turns.
TURNS = 11
#: Blocks of each setup per turn (rotating order), and calls per block: one batch of
#: METRICS_BATCH's default, so that each block of MetricsMiddleware holds one batch's write.
BLOCKS, BLOCK = 40, 32


def isolated(out: TextIO, directory: str, goals: list[list[str]], figures: dict[str, float]) -> None:
    """Time MetricsMiddleware alone around views called directly: no client, no other middleware.

    The setups take turns by blocks of 32 calls (in a rotating order), so that a busy moment of
    the machine or of the database hits every setup alike, and each block of MetricsMiddleware
    holds the write of one batch (METRICS_BATCH): a turn's figure is its blocks' CPU time over
    their calls, and a middleware's overhead is paired with the bare view's of the same turn.
    A fourth setup runs the bare view with a no-op execute wrapper on its connection: what
    Django's execute-wrapper protocol costs any wrapper, the floor under per-query timing.
    """
    rows = []
    with pinned_to_cpus() as pinned, override_scale_settings(METRICS_DIR=directory):
        request, views = isolated_setups()
        for label, setups in views.items():
            setups = {**setups, "no-op wrapper": setups["bare"]}
            times: dict[str, list[float]] = {name: [] for name in setups}
            names = list(setups)
            for turn in range(TURNS):
                spent = dict.fromkeys(names, 0.0)
                for block in range(BLOCKS):
                    shift = (turn + block) % len(names)
                    for name in names[shift:] + names[:shift]:
                        call = setups[name]
                        with without_timing_wrapper(name != "scale"), no_op_wrapper(name == "no-op wrapper"):
                            started = time.thread_time()
                            for _ in range(BLOCK):
                                call(request)
                            spent[name] += time.thread_time() - started
                for name in names:
                    times[name].append(spent[name] / (BLOCKS * BLOCK))
            cpu = {name: statistics.median(found) for name, found in times.items()}
            extra = {
                name: sorted(t - b for t, b in zip(times[name], times["bare"], strict=True)) for name in names
            }
            calls = {}
            for name, call in setups.items():
                with without_timing_wrapper(name != "scale"), no_op_wrapper(name == "no-op wrapper"):
                    calls[name] = function_calls(lambda call=call: call(request), calls=BLOCK)
            for name, found in cpu.items():
                figures[f"cpu {label} {name}"] = found
                figures[f"extra {label} {name}"] = statistics.median(extra[name])
            rows.append(
                [
                    label,
                    f"{cpu['bare'] * 1e6:.1f}",
                    f"{statistics.median(extra['scale']) * 1e6:+.1f}",
                    f"{extra['scale'][1] * 1e6:+.1f} to {extra['scale'][-2] * 1e6:+.1f}",
                    f"{statistics.median(extra['no-op wrapper']) * 1e6:+.1f}",
                    f"{statistics.median(extra['prometheus']) * 1e6:+.1f}",
                    f"{calls['scale'] - calls['bare']:+.0f}",
                    f"{calls['prometheus'] - calls['bare']:+.0f}",
                ]
            )
    disable()
    print_table(
        out,
        "Each middleware alone around a view, called directly (CPU µs and function calls per request;"
        f" overheads: median over {TURNS} turns of the difference with the bare view in the same turn;"
        f" goal <= 20 µs; {pinned})",
        [
            "view",
            "bare µs",
            "django-scale µs",
            "its turns (2nd lowest to 2nd highest)",
            "a no-op execute wrapper µs",
            "django-prometheus µs",
            "django-scale calls",
            "django-prometheus calls",
        ],
        rows,
    )
    for label, title in (("1 query", "one-query"), (TEN, "ten-query")):
        extra = figures[f"extra {label} scale"] * 1e6
        floor = figures[f"extra {label} no-op wrapper"] * 1e6
        goals.append(
            [
                f"request overhead, {title} view (CPU µs, paired per turn; Django's protocol for any"
                " execute wrapper alone)",
                f"{extra:.1f} µs ({floor:.1f} µs)",
                "<= 20 µs",
                met(extra <= 20),
            ]
        )


@contextlib.contextmanager
def pinned_to_cpus() -> Iterator[str]:
    """Pin this process to CPU 0 and its database backend to CPU 1, when the machine and rights
    allow, until the block ends; yield what was done.

    With the client and the server of each query on cores of their own, a turn's time varies
    several times less (the ten-query view's turns over the bare view, on a 2-core machine:
    from 14 to 38 µs over five runs pinned, from 2 to 52 µs in one run not): each query's
    wake-ups no longer depend on where the scheduler put the other process.
    """
    from django.db import connection

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or connection.vendor != "postgresql":
        yield "not pinned to CPUs"
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    try:
        os.sched_setaffinity(backend, {cpus[1]})
    except OSError as error:  # another user's process, or not on this machine
        yield f"not pinned to CPUs: {error.strerror}"
        return
    os.sched_setaffinity(0, {cpus[0]})
    try:
        yield f"this process on CPU {cpus[0]}, its PostgreSQL backend on CPU {cpus[1]}"
    finally:
        os.sched_setaffinity(0, cpus)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(backend, cpus)


@contextlib.contextmanager
def no_op_wrapper(on: bool) -> Iterator[None]:
    """A no-op execute wrapper on this thread's default connection (when *on*), for a block."""
    if not on:
        yield
        return
    from django.db import connection

    with connection.execute_wrapper(_no_op):
        yield


def _no_op(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    return execute(sql, params, many, context)


def function_calls(function: Callable[[], object], calls: int = 1) -> float:
    """Return how many functions (Python and C) a call of *function* calls, over *calls* calls:
    the same on any machine."""
    function()  # warm: first-time imports and caches are not the steady state
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        for _ in range(calls):
            function()
    finally:
        sys.setprofile(None)
    return count / calls


def cpu_per_call(function: Callable[[], object], *, calls: int, repeats: int = 5) -> float:
    """Return the median CPU time (this thread) of one call of *function*, over *repeats* runs."""
    found = []
    for _ in range(repeats):
        started = time.thread_time()
        for _ in range(calls):
            function()
        found.append((time.thread_time() - started) / calls)
    return statistics.median(found)


# -- Instructions (callgrind) ---------------------------------------------------------------------

#: Set in the environment of the process that ``instructions()`` runs under callgrind.
CHILD = "DJANGO_SCALE_BENCH_METRICS_CHILD"
SETUP_NAMES = {"bare": NONE, "scale": SCALE, "prometheus": PROMETHEUS}


def _instruction_segments(options: dict[str, Any]) -> None:
    """(Under callgrind) each isolated setup, then the full-window export, between ``getppid()`` calls.

    As in ``bench request``: callgrind dumps its counters before each ``getppid()``, so each
    even-numbered dump holds one measured segment.
    """
    calls = int(options["calls"])
    with override_scale_settings(METRICS_DIR=options["metrics_dir"]):
        request, views = isolated_setups()
        for setups in views.values():
            for name, call in setups.items():
                with without_timing_wrapper(name != "scale"):
                    for _ in range(20):
                        call(request)
                    metrics.flush()  # each segment holds the writes of whole batches
                    gc.collect()
                    gc.freeze()
                    os.getppid()
                    for _ in range(calls):
                        call(request)
                    os.getppid()
                    gc.unfreeze()
    disable()
    store = SlotStore(options["store_dir"], 16, 1024, 16)
    for _ in range(3):  # the process's first export, then two more
        os.getppid()
        export_full_window(store)
        os.getppid()


def instructions(
    out: TextIO,
    quick: bool,
    metrics_dir: str,
    store_dir: str,
    goals: list[list[str]],
    figures: dict[str, float],
) -> None:
    """Count the instructions of each isolated setup and of the export, under callgrind.

    Unlike time, the count does not move with the load of the machine. A request's
    instructions are turned into microseconds at the rate of the request path itself: each
    view's bare instructions over its timed CPU (:func:`isolated`, the same run). With queries
    that CPU time includes the kernel's work in the socket calls, which callgrind does not
    count: the rate is then lower than the Python code's own, and the estimate errs high. (The
    export's rate, tens of milliseconds of Python without system calls, is about twice the
    rate of a view with queries: it made the request rows look cheaper than they were.) The export's instructions
    are turned into milliseconds at the export's own rate.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        out.write("\n(Instructions: valgrind is not installed; apt-get install valgrind.)\n")
        return
    calls = BLOCK * (2 if quick else 8)  # whole batches
    with tempfile.TemporaryDirectory() as directory:
        options = {"calls": calls, "metrics_dir": metrics_dir, "store_dir": store_dir}
        rerun_under_callgrind(valgrind, directory, {CHILD: json.dumps(options)})
        dumps: dict[int, int] = {}
        for file in Path(directory).glob("cg.*.*-01"):  # the main thread's dumps
            number = int(re.search(r"\.(\d+)-01$", file.name).group(1))  # type: ignore[union-attr]
            summary = re.search(r"^(?:summary|totals): (\d+)", file.read_text(), re.MULTILINE)
            assert summary is not None, file
            dumps[number] = int(summary.group(1))
    segments = [dumps[number] for number in sorted(dumps) if number % 2 == 0]
    labels = ["no query", "1 query", TEN]
    per_call = {
        (label, name): segments[index * 3 + position] / calls
        for index, label in enumerate(labels)
        for position, name in enumerate(SETUP_NAMES)
    }
    exports = segments[len(labels) * 3 :]
    # Instructions per CPU microsecond of the export, from the exports after the first.
    rate = statistics.median(exports[1:]) / (figures["export full"] * 1e6)
    # Instructions per CPU microsecond of the request path: each bare view's, timed in isolated().
    view_rate = {label: per_call[(label, "bare")] / (figures[f"cpu {label} bare"] * 1e6) for label in labels}
    rows = []
    for label in labels:
        bare = per_call[(label, "bare")]
        for name, title in SETUP_NAMES.items():
            value = per_call[(label, name)]
            rows.append(
                [
                    label,
                    title,
                    f"{value / 1000:,.1f}k",
                    f"{(value - bare) / 1000:+,.1f}k",
                    f"{view_rate[label]:,.0f}",
                    f"{(value - bare) / view_rate[label]:+.1f}",
                ]
            )
    print_table(
        out,
        f"CPU instructions per request, each middleware alone around the view (callgrind; {calls} calls per cell;"
        " µs at the rate of the bare view, its instructions over its timed CPU)",
        ["view", "setup", "instructions", "over bare", "instructions per µs", "≈ µs over bare"],
        rows,
    )
    first, *later = exports
    print_table(
        out,
        "CPU instructions of the Prometheus export over the full 5-minute window (callgrind;"
        f" ms at the export's own rate of {rate:,.0f} instructions per CPU µs; a first export's"
        " page faults are kernel time, which callgrind does not count: see its timed row)",
        ["export", "instructions", "≈ ms"],
        [
            ["the process's first", f"{first / 1e6:,.1f} M", f"{first / rate / 1000:.1f}"],
            *[
                [f"then #{n}", f"{value / 1e6:,.1f} M", f"{value / rate / 1000:.1f}"]
                for n, value in enumerate(later, 2)
            ],
        ],
    )
    extra = per_call[(TEN, "scale")] - per_call[(TEN, "bare")]
    goals.append(
        [
            "request overhead, ten-query view (instructions; µs at the bare view's rate)",
            f"{extra / 1000:+,.1f}k; {extra / view_rate[TEN]:.1f} µs",
            "<= 20 µs",
            met(extra / view_rate[TEN] <= 20),
        ]
    )
    goals.append(
        [
            "export, full window (instructions of the slowest, at the export's rate)",
            f"{max(exports) / 1e6:,.0f} M; {max(exports) / rate / 1000:.1f} ms",
            "<= 50 ms",
            met(max(exports) / rate / 1000 <= 50),
        ]
    )


def run(out: TextIO, quick: bool = False) -> None:
    child = os.environ.get(CHILD)
    if child:
        _instruction_segments(json.loads(child))
        return
    goals: list[list[str]] = []
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as directory, tempfile.TemporaryDirectory() as full:
        overhead(out, quick, directory, goals, figures)
        accuracy(out, quick, goals)
        scale(out, quick, goals)
        full_window(out, quick, full, goals, figures)
        instructions(out, quick, directory, full, goals, figures)
    load = os.getloadavg()
    print_table(
        out,
        f"Goals (issue 14); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs",
        ["goal", "measured", "goal", "verdict"],
        goals,
    )
