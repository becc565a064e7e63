"""``bench metrics``, its accuracy and scale parts: merged percentiles against exact ones, and the export.

* **Accuracy**: 4 processes record the same latencies into the shared store; the merged
  p50/p99/p99.9 against the exact percentiles of all the values, and against what
  Prometheus's ``histogram_quantile()`` (linear interpolation inside django-prometheus's
  default buckets) answers for the same values.
* **Scale**: 8 worker processes recording over 200 routes, recycled until 1,000 (``--quick``:
  100) processes have come and gone: the export time, the file's size and blocks, slots
  used, and whether the totals are exact; then the export over a full 5-minute window
  (8 live workers x 400 timing series, values in each of 6 minutes).

Each part adds its goals, met or not, to the list :mod:`benchmarks.metrics` prints last.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from django_scale import metrics
from django_scale.metrics.sketch import bucket_of
from django_scale.metrics.store import SlotStore

from benchmarks import print_table

FORK = multiprocessing.get_context("fork")


def met(met: bool) -> str:
    return "met" if met else "NOT MET"


def minor_faults() -> int:
    """This process's minor page faults so far (pages mapped on first touch: the shared file's, the heap's)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def first_export(export: Any) -> tuple[float, float, int, int]:
    """Run *export* (a process's first), return its CPU and kernel CPU seconds, minor and major faults.

    A read of a hole of the sparse metrics file counts as a major fault though no disk is read
    (the kernel fills a page with zeros): the shared file's pages first touched are most of them.
    """
    before, cpu = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    export()
    cpu = time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (
        cpu,
        after.ru_stime - before.ru_stime,
        after.ru_minflt - before.ru_minflt,
        after.ru_majflt - before.ru_majflt,
    )


def first_row(cpu: float, kernel: float, minor: int, major: int) -> str:
    return f"{cpu * 1000:.1f} ms ({kernel * 1000:.1f} ms); {minor:,} / {major:,}"


# -- Accuracy -------------------------------------------------------------------------------------


#: django-prometheus's default latency buckets (django_prometheus.conf.PROMETHEUS_LATENCY_BUCKETS).
def prometheus_buckets() -> tuple[float, ...]:
    from django_prometheus.conf import PROMETHEUS_LATENCY_BUCKETS

    return tuple(PROMETHEUS_LATENCY_BUCKETS)


def histogram_quantile(q: float, bounds: tuple[float, ...], values: list[float]) -> float:
    """What PromQL's histogram_quantile() answers from cumulative bucket counts of *values*."""
    counts = [sum(1 for v in values if v <= bound) for bound in bounds]
    total = counts[-1]
    rank = q * total
    for index, (bound, cumulative) in enumerate(zip(bounds, counts, strict=True)):
        if cumulative >= rank:
            if math.isinf(bound):
                return bounds[index - 1]
            lower = bounds[index - 1] if index else 0.0
            below = counts[index - 1] if index else 0
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
    return bounds[-2]


def distributions(n: int) -> dict[str, list[list[float]]]:
    """Four processes' latencies for each of three shapes (seconds)."""
    shapes: dict[str, list[list[float]]] = {}
    for name, draw in (
        ("lognormal, median 50 ms", lambda rng: rng.lognormvariate(math.log(0.05), 0.8)),
        ("lognormal, median 3 ms (cache hits)", lambda rng: rng.lognormvariate(math.log(0.003), 0.6)),
        (
            "bimodal: 90 % ~20 ms, 10 % ~800 ms",
            lambda rng: (
                rng.lognormvariate(math.log(0.02), 0.3)
                if rng.random() < 0.9
                else rng.lognormvariate(math.log(0.8), 0.4)
            ),
        ),
    ):
        shapes[name] = []
        for seed in range(4):
            rng = random.Random(f"{name}-{seed}")
            shapes[name].append([draw(rng) for _ in range(n)])
    return shapes


def _record_worker(directory: str, name: str, values: list[float]) -> None:
    store = SlotStore(directory, 8, 64, 4)
    for value in values:
        store.record([(name, bucket_of(value), value)], ())


def accuracy(out: TextIO, quick: bool, goals: list[list[str]]) -> None:
    n = 5_000 if quick else 50_000
    bounds = prometheus_buckets()
    rows = []
    worst = 0.0
    worst_prometheus = 0.0
    for shape, per_process in distributions(n).items():
        with tempfile.TemporaryDirectory() as directory:
            processes = [
                FORK.Process(target=_record_worker, args=(directory, "request\x1fr\x1fGET", values))
                for values in per_process
            ]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
                assert process.exitcode == 0
            snapshot = SlotStore(directory, 8, 64, 4).snapshot()
        sketch = snapshot.windows["request\x1fr\x1fGET"][5]
        everything = sorted(v for values in per_process for v in values)
        assert sketch.count == len(everything) == snapshot.totals["request\x1fr\x1fGET"][0]
        for q in (0.5, 0.99, 0.999):
            exact = everything[math.floor(q * (len(everything) - 1))]
            ours = sketch.quantile(q) or 0.0
            theirs = histogram_quantile(q, bounds, everything)
            ours_error = abs(ours - exact) / exact
            theirs_error = abs(theirs - exact) / exact
            worst, worst_prometheus = max(worst, ours_error), max(worst_prometheus, theirs_error)
            rows.append(
                [
                    shape,
                    f"p{q * 100:g}",
                    f"{exact * 1000:.3f}",
                    f"{ours * 1000:.3f}",
                    f"{ours_error:.2%}",
                    f"{theirs * 1000:.3f}",
                    f"{theirs_error:.2%}",
                ]
            )
    print_table(
        out,
        f"Accuracy: 4 processes x {n:,} values merged, against the exact percentiles (ms; goal <= 1 %)",
        ["values", "q", "exact", "django-scale", "error", "django-prometheus*", "error"],
        rows,
    )
    out.write(
        f"  worst error: django-scale {worst:.2%}, django-prometheus {worst_prometheus:.2%}\n"
        "  * histogram_quantile() over django-prometheus's default buckets, as Grafana shows it\n"
    )
    goals.append(
        [
            "accuracy: worst of p50/p99/p99.9, 4 processes merged",
            f"{worst:.2%} (django-prometheus {worst_prometheus:.2%})",
            "<= 1 %",
            met(worst <= 0.01),
        ]
    )


# -- Scale ----------------------------------------------------------------------------------------


def _record_request(store: SlotStore, route: int, value: float, now: float | None = None) -> None:
    """Record what MetricsMiddleware records of a GET of route *route* that took *value* seconds."""
    labels = f"r{route}\x1fGET"
    store.record(
        [
            (f"request\x1f{labels}", bucket_of(value), value),
            (f"db\x1f{labels}\x1fdefault", bucket_of(value / 3), value / 3),
        ],
        [(f"requests\x1f{labels}\x1f2xx", 1), (f"queries\x1f{labels}\x1fdefault", 2)],
        now,
    )


def _scale_worker(directory: str, seed: int, per_worker: int, routes: int) -> None:
    store = SlotStore(directory, 16, 1024, 16)
    rng = random.Random(seed)
    for _ in range(per_worker):
        route = rng.randrange(routes)
        value = rng.lognormvariate(math.log(0.03), 0.9)
        _record_request(store, route, value)


def scale(out: TextIO, quick: bool, goals: list[list[str]]) -> None:
    workers, routes = 8, 200
    generations = 100 if quick else 1000
    per_worker = 400
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        live: list[Any] = []
        sizes = set()
        for seed in range(generations):
            while len(live) >= workers:
                live[0].join()
                assert live[0].exitcode == 0
                live.pop(0)
            process = FORK.Process(target=_scale_worker, args=(directory, seed, per_worker, routes))
            process.start()
            live.append(process)
            if seed % 10 == 1:
                sizes.update(path.stat().st_size for path in Path(directory).iterdir())
        for process in live:
            process.join()
        # And at the end: with --quick's 100 workers, the first look may come before any file.
        sizes.update(path.stat().st_size for path in Path(directory).iterdir())
        elapsed = time.perf_counter() - started
        files = list(Path(directory).iterdir())
        store = SlotStore(directory, 16, 1024, 16)
        # The first export of a process: nothing kept from an earlier one (label texts).
        first = first_export(lambda: metrics.prometheus_text(store.snapshot(windows=(5,))))
        exports, export_cpus, documents = [], [], []
        for _ in range(5):
            begun, cpu = time.perf_counter(), time.process_time()
            # What GET /scale/metrics does: one window's sketches, then the text.
            text = metrics.prometheus_text(store.snapshot(windows=(5,)))
            export_cpus.append(time.process_time() - cpu)
            exports.append(time.perf_counter() - begun)
            cpu = time.process_time()
            # What GET /scale/sketches.json does: every window, as JSON.
            json.dumps(metrics.to_document(store.snapshot()))
            documents.append(time.process_time() - cpu)
        snapshot = store.snapshot()
        size, blocks = store.file_usage()
    requests = sum(v for name, v in snapshot.counters.items() if name.startswith("requests\x1f"))
    queries = sum(v for name, v in snapshot.counters.items() if name.startswith("queries\x1f"))
    timed = sum(count for name, (count, _) in snapshot.totals.items() if name.startswith("request\x1f"))
    expected = generations * per_worker
    print_table(
        out,
        f"Scale: {workers} workers x {routes} routes, {generations:,} worker processes in turn "
        f"({per_worker} requests each, {elapsed:.1f} s)",
        ["figure", "value", "goal"],
        [
            [
                "Prometheus export (5 min window): CPU; wall; median of 5",
                f"{statistics.median(export_cpus) * 1000:.1f} ms; {statistics.median(exports) * 1000:.1f} ms",
                "<= 50 ms",
            ],
            [
                "Prometheus export, the process's first: CPU (in the kernel); page faults minor / major",
                first_row(*first),
                "<= 50 ms",
            ],
            [
                "sketches.json (every window): CPU, median of 5",
                f"{statistics.median(documents) * 1000:.1f} ms",
                "",
            ],
            ["exposition size", f"{len(text) / 1024:.0f} KiB", ""],
            ["files in the metrics directory", str(len(files)), "1"],
            ["file size (apparent), sizes seen", f"{size / 2**20:.0f} MiB, {len(sizes)} size(s)", "constant"],
            ["file blocks really used", f"{blocks / 2**20:.1f} MiB", "bounded"],
            ["slots ever used", str(snapshot.used_slots), f"<= {workers + 1}"],
            ["requests counted / recorded", f"{requests:,} / {expected:,}", "exact"],
            ["latencies timed / recorded", f"{timed:,} / {expected:,}", "exact"],
            ["queries counted / recorded", f"{queries:,} / {2 * expected:,}", "exact"],
            ["values dropped", str(snapshot.dropped), "0"],
        ],
    )
    exact = requests == timed == expected and queries == 2 * expected
    bounded = len(files) == 1 and len(sizes) == 1 and snapshot.used_slots <= workers + 1
    goals.append(
        [
            f"export after {generations:,} recycled workers (CPU, median of 5; the first)",
            f"{statistics.median(export_cpus) * 1000:.1f} ms; {first[0] * 1000:.1f} ms",
            "<= 50 ms",
            met(max(statistics.median(export_cpus), first[0]) <= 0.05),
        ]
    )
    goals.append(["totals exact after recycling", f"{requests:,} / {expected:,}", "exact", met(exact)])
    goals.append(
        [
            "one file of constant size, slots bounded",
            f"{len(files)} file, {len(sizes)} size(s)",
            "bounded",
            met(bounded),
        ]
    )
    assert exact, "totals are not exact"


#: A full 5-minute window: 8 workers at once, each series with values in each of 6 minutes.
FULL_WORKERS, FULL_ROUTES, FULL_MINUTES = 8, 200, 6
#: The minute the full window ends in (any past minute will do: snapshots take it as "now").
FULL_NOW = 1_800_000_030.0


def _full_worker(directory: str, seed: int, per_minute: int, together: Any) -> None:
    store = SlotStore(directory, 16, 1024, 16)
    store.record((), (), FULL_NOW)  # claim a slot, then wait until every worker holds one
    together.wait(60)
    rng = random.Random(seed)
    for minutes_ago in range(FULL_MINUTES - 1, -1, -1):
        now = FULL_NOW - 60 * minutes_ago
        for index in range(per_minute):
            route = index % FULL_ROUTES
            value = rng.lognormvariate(math.log(0.03), 0.9)
            _record_request(store, route, value, now)


def fill_full_window(directory: str, quick: bool) -> int:
    """Fill *directory*'s store as 8 live workers x 400 series over a full window; return the requests."""
    per_minute = FULL_ROUTES * (2 if quick else 5)
    together = FORK.Barrier(FULL_WORKERS)
    processes = [
        FORK.Process(target=_full_worker, args=(directory, seed, per_minute, together))
        for seed in range(FULL_WORKERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        assert process.exitcode == 0
    return FULL_WORKERS * FULL_MINUTES * per_minute


def export_full_window(store: SlotStore) -> str:
    """What GET /scale/metrics does over the full window (5 minutes), with the process's store."""
    return metrics.prometheus_text(store.snapshot(windows=(5,), now=FULL_NOW))


def full_window(
    out: TextIO, quick: bool, directory: str, goals: list[list[str]], figures: dict[str, float]
) -> None:
    requests = fill_full_window(directory, quick)
    store = SlotStore(directory, 16, 1024, 16)
    first = first_export(lambda: export_full_window(store))
    cpus, steady_faults = [], []
    for _ in range(5):
        faults, cpu = minor_faults(), time.process_time()
        text = export_full_window(store)
        cpus.append(time.process_time() - cpu)
        steady_faults.append(minor_faults() - faults)
    snapshot = store.snapshot(windows=(5,), now=FULL_NOW)
    counted = sum(v for name, v in snapshot.counters.items() if name.startswith("requests\x1f"))
    in_window = sum(
        found[5].count for name, found in snapshot.windows.items() if name.startswith("request\x1f")
    )
    figures["export full"] = statistics.median(cpus)
    print_table(
        out,
        f"Export over a full 5-minute window: {FULL_WORKERS} live workers x {2 * FULL_ROUTES} timing series, "
        f"values in each of {FULL_MINUTES} minutes ({requests:,} requests)",
        ["figure", "value", "goal"],
        [
            [
                "Prometheus export: CPU; minor page faults, median of 5",
                f"{statistics.median(cpus) * 1000:.1f} ms; {statistics.median(steady_faults):,.0f}",
                "<= 50 ms",
            ],
            [
                "Prometheus export, the process's first: CPU (in the kernel); page faults minor / major",
                first_row(*first),
                "<= 50 ms",
            ],
            ["exposition size", f"{len(text) / 1024:.0f} KiB", ""],
            [
                "requests counted / in the window / recorded",
                f"{counted:,} / {in_window:,} / {requests:,}",
                "exact",
            ],
        ],
    )
    goals.append(
        [
            "export, full 5-minute window, 8 x 400 series (CPU, median of 5; the first)",
            f"{statistics.median(cpus) * 1000:.1f} ms; {first[0] * 1000:.1f} ms",
            "<= 50 ms",
            met(max(statistics.median(cpus), first[0]) <= 0.05),
        ]
    )
    goals.append(
        [
            "full window: every request in it",
            f"{in_window:,} / {requests:,}",
            "exact",
            met(counted == in_window == requests),
        ]
    )
