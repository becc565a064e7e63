"""``bench site``'s tables on stdout, from the figures :func:`~benchmarks.site.run.run` collects.

Everything printed is in the figures (``--json``): the tables only read them.
"""

from __future__ import annotations

from typing import Any, TextIO

from benchmarks import print_table
from benchmarks.metrics_scale import met
from benchmarks.site.loadgen import P99_LIMIT

#: The phase at half of tuned's capacity (tuned's and django-scale's, with no fault): the
#: faults' rate, their baseline, and where the two configurations' primary time is compared.
HALF_TUNED = "open at the faults' rate"

__all__ = ["print_results"]


def print_results(out: TextIO, results: dict[str, Any]) -> None:
    """Print every table of a run's *results*."""
    _print(out, results)
    _print_asgi(out, results)
    _print_pages(out, results)
    _print_faults(out, results)
    _print_expiry(out, results)
    _print_phases(out, results)
    _print_goals(out, results)


def _open_keys(results: dict[str, Any]) -> list[str]:
    return [f"open {load:.0%}" for load in results["loads"]]


def _phase_keys(results: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """The loaded phases a configuration ran, in the tables' order."""
    return [key for key in ("closed loop", *_open_keys(results), HALF_TUNED) if key in figures]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _ratio(value: float, stock: float) -> str:
    return f"{value / stock:.1f}x" if stock else "-"


def _print(out: TextIO, results: dict[str, Any]) -> None:
    rows = []
    for config, figures in results["configs"].items():
        for key in _phase_keys(results, figures):
            phase = figures[key]
            label = key if key == "closed loop" else f"{key} ({phase['rate']:g}/s)"
            for page, summary in [("all", phase["all"]), *phase["pages"].items()]:
                rows.append(
                    [config, label, page, summary["requests"], summary["errors"], f"{summary['throughput']:.1f}",
                     _ms(summary["p50"]), _ms(summary["p99"]), _ms(summary["p99.9"]), _ms(summary["max"])]
                )  # fmt: skip
    print_table(
        out,
        "Latency per configuration, phase and page (ms; open loop: from the intended send time)",
        ["config", "phase", "page", "requests", "errors", "req/s", "p50", "p99", "p99.9", "max"],
        rows,
    )
    rows = []
    for config, figures in results["configs"].items():
        for key in _phase_keys(results, figures):
            server = figures[key]["server"]
            rows.append(
                [config, key, f"{server['app_cpu_ms_per_request']:.2f}",
                 f"{server['primary_queries_per_request']:.2f}", f"{server['replica_queries_per_request']:.2f}",
                 f"{server['primary_exec_ms_per_request']:.3f}", f"{server['replica_exec_ms_per_request']:.3f}",
                 server["primary_connections_peak"], server["replica_connections_peak"]]
            )  # fmt: skip
    print_table(
        out,
        "Server side per request (gunicorn workers' CPU; pg_stat_statements calls and execution time),"
        " and peak connections held",
        [
            "config",
            "phase",
            "app CPU ms",
            "primary queries",
            "replica queries",
            "primary exec ms",
            "replica exec ms",
            "primary conns",
            "replica conns",
        ],
        rows,
    )
    for config, figures in _runs(results):
        for key in _open_keys(results):
            lag = figures[key]["all"]["send_lag_p99"]
            if lag > 0.01:
                out.write(
                    f"\nnote: {config}, {key}: the generator sent late (p99 {_ms(lag)} ms after the "
                    "intended time; a busy machine): the latencies include it.\n"
                )
    stock = results["configs"]["stock"]
    rows = []
    for config, figures in results["configs"].items():
        capacity, closed = figures["capacity"]["rate"], figures["closed loop"]["all"]["throughput"]
        rows.append(
            [config, f"{capacity:.1f}", _ratio(capacity, stock["capacity"]["rate"]),
             f"{closed:.1f}", _ratio(closed, stock["closed loop"]["all"]["throughput"]),
             "  ".join(f"{s['rate']:g}:{_ms(s['p99'])}{'' if s['passed'] else '!'}"
                       for s in figures["capacity"]["steps"])]
        )  # fmt: skip
    print_table(
        out,
        f"Capacity: the highest fixed rate with p99 < {P99_LIMIT:g} s and no errors (open-loop steps,"
        f" rate:p99 ms, ! failed); the closed loop's throughput ({results['connections']} connections) beside it",
        ["config", "capacity req/s", "x stock", "closed loop req/s", "x stock", "steps"],
        rows,
    )


def _difference(server: float | None, generator: float) -> str:
    return "-" if server is None else f"{(server - generator) / generator:+.1%}"


def _runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The WSGI configurations, and the ASGI run after them."""
    return [
        *results["configs"].items(),
        *((("scale (uvicorn)", results["asgi"]),) if "asgi" in results else ()),
    ]


def _print_pages(out: TextIO, results: dict[str, Any]) -> None:
    rows = []
    for config, figures in _runs(results):
        for page, probe in figures["pages"].items():
            server, generator = probe["server"], probe["generator"]
            inside, total = probe.get("server side"), probe.get("server + queue")
            rows.append(
                [config, page, probe["all"]["requests"], f"{server['primary_queries_per_request']:.2f}",
                 f"{server['replica_queries_per_request']:.2f}", _ms(generator["p50"]), _ms(generator["p99"]),
                 *(("-",) * 7 if not inside or not total else
                   (_ms(inside["p50"]), _ms(inside["p99"]), _ms(total["p50"]), _ms(total["p99"]),
                    _difference(total["p50"], generator["p50"]), _difference(total["p99"], generator["p99"]),
                    _ms(probe["rest"]["p50"])))]
            )  # fmt: skip
    print_table(
        out,
        "Per page, sent alone by one client: queries per request, and the generator's time from the"
        " request on the wire to its last byte against MetricsMiddleware's latency, and its latency +"
        " queue time (from X-Request-Start, the generator's send time; scale only; ms)",
        ["config", "page", "requests", "primary q", "replica q", "gen p50", "gen p99",
         "server p50", "server p99", "+queue p50", "+queue p99", "p50 diff", "p99 diff", "rest p50"],
        rows,
    )  # fmt: skip
    if "floor" in results:
        print_table(
            out,
            "The floor: a no-op application under each app server, one client: the generator's service"
            " time, and its part before the application (from X-Request-Start: the queue time) and after it (ms)",
            ["server", "requests", "errors", "p50", "p99", "before p50", "before p99", "after p50", "after p99"],
            [[server, f["requests"], f["errors"], _ms(f["p50"]), _ms(f["p99"]),
              _ms(f["before the app"]["p50"]), _ms(f["before the app"]["p99"]),
              _ms(f["after the app"]["p50"]), _ms(f["after the app"]["p99"])]
             for server, f in results["floor"].items()],
        )  # fmt: skip


def _print_asgi(out: TextIO, results: dict[str, Any]) -> None:
    if "asgi" not in results:
        return
    rows = []
    for key in _open_keys(results):
        for server, figures in (("gunicorn", results["configs"]["scale"]), ("uvicorn", results["asgi"])):
            phase = figures[key]
            for page, summary in [("all", phase["all"]), *phase["pages"].items()]:
                rows.append(
                    [f"{key} ({phase['rate']:g}/s)", page, server, summary["requests"], summary["errors"],
                     _ms(summary["p50"]), _ms(summary["p99"]), _ms(summary["p99.9"]), _ms(summary["max"]),
                     f"{phase['server']['app_cpu_ms_per_request']:.2f}" if page == "all" else ""]
                )  # fmt: skip
    print_table(
        out,
        f"django-scale under gunicorn (WSGI, {results['workers']} sync workers) and uvicorn (ASGI,"
        f" {results['workers']} workers),"
        " the same fixed rates (ms; open loop: from the intended send time)",
        ["phase", "page", "server", "requests", "errors", "p50", "p99", "p99.9", "max", "app CPU ms"],
        rows,
    )


def _print_phases(out: TextIO, results: dict[str, Any]) -> None:
    phases = results["phases"]
    print_table(
        out,
        "Each phase's wall seconds, and the full run's estimate (this run's seconds beyond the load,"
        " plus the full run's load)",
        ["phase", "seconds", "full run estimate"],
        [
            [row["phase"], f"{row['seconds']:.1f}", f"{row['full run estimate']:.0f}"]
            for row in phases["phases"]
        ],
    )
    out.write(
        f"\nwhole run: {results['seconds']:.0f} s; the full run's estimate: "
        f"{phases['full run estimate without seeding'] / 60:.1f} min, plus seeding 1,000,000 articles\n"
    )


def _print_faults(out: TextIO, results: dict[str, Any]) -> None:
    rows = []
    for config, figures in results["configs"].items():
        if "faults" not in figures:
            continue
        for fault in figures["faults"]["faults"]:
            recovery = fault["recovery seconds"]
            rows.append(
                [config, f"{figures['faults']['rate']:g}", fault["fault"], fault["5xx"], fault["no answer"],
                 fault["errors in flight at the fault"], fault["in flight at the fault"],
                 f"{fault['canary stale reads']}/{fault['canary rounds']}", fault["canary errors"],
                 _ms(fault["baseline p99"]), _ms(fault["p99 during"]), _ms(fault["p99 after"]),
                 "never" if recovery is None else f"{recovery:.1f}"]
            )  # fmt: skip
    if rows:
        print_table(
            out,
            "Faults during an open loop (rate/s; from the fault on; recovered: s after the part came back"
            " from which on the p99, each request against 2x its page's baseline, is under it and nothing fails)",
            ["config", "rate", "fault", "5xx", "no answer", "errors in flight", "in flight", "canary stale",
             "canary errors", "baseline p99", "p99 during", "p99 after", "recovered s"],
            rows,
        )  # fmt: skip


def _print_expiry(out: TextIO, results: dict[str, Any]) -> None:
    if "expiry" not in results:
        return
    expiry = results["expiry"]
    tuned, scale = expiry["tuned"], expiry["scale"]
    rows = []
    for page in ("all", *(name for name in tuned["pages"] if name in scale["pages"])):
        pair = [
            tuned["all"] if page == "all" else tuned["pages"][page],
            scale["all"] if page == "all" else scale["pages"][page],
        ]
        for config, summary in zip(("tuned", "scale"), pair, strict=True):
            rows.append(
                [page, config, summary["requests"], summary["errors"], _ms(summary["p50"]), _ms(summary["p99"]),
                 _ms(summary["p99.9"]), _ms(summary["max"]),
                 _ratio(pair[0]["p99"], summary["p99"]) if config == "scale" else ""]
            )  # fmt: skip
    print_table(
        out,
        f"Through cache expiry: the cached pages fresh for {tuned['ttl']} s, an open loop at {tuned['rate']:g}/s"
        " (half of tuned's capacity; ms; p99 tuned / scale)",
        ["page", "config", "requests", "errors", "p50", "p99", "p99.9", "max", "p99 tuned/scale"],
        rows,
    )


def _db_ms(server: dict[str, Any]) -> float:
    """Statement execution time per request on the primary and the replica together (ms)."""
    return float(server["primary_exec_ms_per_request"] + server["replica_exec_ms_per_request"])


def _print_goals(out: TextIO, results: dict[str, Any]) -> None:
    """The issue's goals, each with what this run measured and whether it is met."""
    configs = results["configs"]
    stock, tuned, scale = configs["stock"], configs["tuned"], configs["scale"]
    rows = []
    heavy = f"open {results['loads'][-1]:.0%}"

    def page_p(figures: dict[str, Any], page: str, key: str) -> float | None:
        summary = figures[heavy]["pages"].get(page)
        return None if summary is None else float(summary[key])

    for page, label in (("front page", "front page"), ("section", "listing")):
        before, after = page_p(stock, page, "p99"), page_p(scale, page, "p99")
        if before is not None and after is not None:
            rows.append([f"{label} p99 >= 10x lower than stock ({heavy})", f"{_ms(before)} -> {_ms(after)} ms: "
                         f"{_ratio(before, after)}", met(before >= 10 * after)])  # fmt: skip
    before, after = _db_ms(stock[heavy]["server"]), _db_ms(scale[heavy]["server"])
    rows.append([f"database time per request >= 10x lower than stock ({heavy})",
                 f"{before:.3f} -> {after:.3f} ms: {_ratio(before, after)}", met(before >= 10 * after)])  # fmt: skip
    before, after = stock["capacity"]["rate"], scale["capacity"]["rate"]
    rows.append(["capacity >= 5x stock", f"{before:.1f} -> {after:.1f} req/s: {_ratio(after, before)}",
                 met(after >= 5 * before)])  # fmt: skip
    front = page_p(scale, "front page", "p50")
    if front is not None:
        rows.append([f"front page p50 <= 30 ms ({heavy})", f"{_ms(front)} ms", met(front <= 0.030)])
    if "expiry" in results:
        expiry = results["expiry"]
        before, after = expiry["tuned"]["all"]["p99"], expiry["scale"]["all"]["p99"]
        rows.append(["p99 through cache expiry >= 3x lower than tuned",
                     f"{_ms(before)} -> {_ms(after)} ms: {_ratio(before, after)}", met(before >= 3 * after)])  # fmt: skip
    # At half of tuned's capacity where both ran it (a phase with writes in it: at 80 % of
    # stock's capacity a phase holds a few dozen requests), else at the heavy open loop.
    phase = HALF_TUNED if HALF_TUNED in tuned and HALF_TUNED in scale else heavy
    before, after = (
        tuned[phase]["server"]["primary_exec_ms_per_request"],
        scale[phase]["server"]["primary_exec_ms_per_request"],
    )
    where = f"{tuned[phase]['rate']:g}/s" if phase == HALF_TUNED else heavy
    rows.append([f"primary time per request <= 0.5x tuned ({where})",
                 f"{before:.3f} -> {after:.3f} ms: {_ratio(before, after)}", met(after <= 0.5 * before)])  # fmt: skip
    for page in ("admin filtered", "admin search"):
        if page in tuned["pages"] and page in scale["pages"]:
            before, after = tuned["pages"][page]["generator"]["p50"], scale["pages"][page]["generator"]["p50"]
            rows.append([f"changelist ({page}, sent alone, p50) >= 5x faster than tuned",
                         f"{_ms(before)} -> {_ms(after)} ms: {_ratio(before, after)}", met(before >= 5 * after)])  # fmt: skip
    faults = scale.get("faults", {}).get("faults", [])
    if faults:
        beyond = sum(f["errors"] - f["errors in flight at the fault"] for f in faults)
        rows.append(["faults: 0 errors beyond the requests in flight", str(beyond), met(beyond == 0)])
        stale = sum(f["canary stale reads"] for f in faults)
        rounds = sum(f["canary rounds"] for f in faults)
        rows.append(["faults: 0 stale reads for the canary", f"{stale} of {rounds}", met(stale == 0)])
        slow = [
            f"{f['fault']} "
            + ("never" if f["recovery seconds"] is None else f"{f['recovery seconds']:.1f} s")
            for f in faults
            if f["recovery seconds"] is None or f["recovery seconds"] > 5
        ]
        worst = max((f["recovery seconds"] for f in faults if f["recovery seconds"] is not None), default=0.0)
        rows.append(["faults: p99 under 2x baseline within 5 s of recovery",
                     "; ".join(slow) if slow else f"all within {worst:.1f} s", met(not slow)])  # fmt: skip
    # What no middleware can see: the answer's way back through the app server to the generator,
    # measured on the no-op application under gunicorn in the same run (its "after the app").
    way_back = results.get("floor", {}).get("gunicorn", {}).get("after the app", {}).get("p50") or 0.0
    differences = []
    for page, probe in scale["pages"].items():
        total, generator = probe.get("server + queue"), probe["generator"]
        if total:
            differences.append((page, (total["p50"] + way_back - generator["p50"]) / generator["p50"]))
    if differences:
        outside = [f"{page} {difference:+.0%}" for page, difference in differences if abs(difference) > 0.05]
        rows.append([f"server (+ queue + the floor's way back, {_ms(way_back)} ms) and generator p50 within 5 %"
                     " (gunicorn, pages alone)",
                     "; ".join(outside) if outside else "every page", met(not outside)])  # fmt: skip
    print_table(out, "Goals (issue 15)", ["goal", "measured", "verdict"], rows)
