"""``bench request``'s counts, which do not move with the machine's load.

Per sync request, the function calls (``sys.setprofile``) and the Python bytecode steps
(``sys.settrace`` with ``f_trace_opcodes``) in this thread; per request, sync and async, the
CPU instructions of this process under callgrind (:func:`instructions`, which runs
``bench request`` again as its child). The setups, views and timing are in
:mod:`benchmarks.request`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient, Client
from django.test.utils import override_settings

from benchmarks import print_table, rerun_under_callgrind
from benchmarks.request import (
    MULTIDB,
    SCALE,
    STOCK,
    VIEWS,
    _check_routing,
    _reset_multidb,
    setups,
)


def _count_steps(client: Client, url: str, requests: int) -> tuple[float, float]:
    """The function calls (Python and C) and Python bytecode steps per request of *url*."""
    calls = steps = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        if event == "opcode":
            steps += 1
        elif event == "call":
            frame.f_trace_opcodes = True
        return trace

    sys.setprofile(profile)
    sys.settrace(trace)
    try:
        for _ in range(requests):
            client.get(url)
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return calls / requests, steps / requests


def calls_per_request(out: TextIO, replica: str, quick: bool) -> None:
    """Count the function calls and the Python bytecode steps of a sync request in each setup.

    Calls are Python's and C's (``sys.setprofile``), steps the interpreter's opcodes of Python
    code (``sys.settrace`` with ``f_trace_opcodes``), both in this thread. Unlike time, the
    counts do not depend on what else the machine does: they show the work each setup adds to
    a request, call for call and step for step. On this path the steps predict the time better
    than the instructions do: code run once per request or per query runs with cold caches,
    so each step costs about the same whatever it does (see ``docs/benchmarks.md``).
    """
    requests = 20 if quick else 200
    rows: list[list[object]] = []
    # A process's first run under the hooks counts no steps on Python 3.12 and fewer on 3.13
    # (a loop of ten additions: 0 then 237 steps on 3.12, 138 then 207 on 3.13; the same on
    # 3.10 and 3.11): a pass whose counts are dropped.
    with override_settings(**setups(replica)[STOCK]):
        _count_steps(Client(), "/sync/1/", 5)
    for label, url, is_async in VIEWS:
        if is_async:
            continue  # the ORM's thread is not this one: the hooks would miss its work
        counts: dict[str, tuple[float, float]] = {}
        for name, options in setups(replica).items():
            _reset_multidb()
            with override_settings(**options):
                client = Client()
                for _ in range(5):
                    client.get(url)
                counts[name] = _count_steps(client, url, requests)
        for name, (value, step) in counts.items():
            stock, anchor = counts[STOCK], counts[MULTIDB]
            rows.append(
                [
                    label,
                    name,
                    f"{value:.0f}",
                    f"{value - stock[0]:+.0f}",
                    f"{value - anchor[0]:+.0f}",
                    f"{step:.0f}",
                    f"{step - stock[1]:+.0f}",
                    f"{step - anchor[1]:+.0f}",
                ]
            )
    print_table(
        out,
        f"Function calls and Python bytecode steps per request (this thread; {requests} requests): "
        "the same on any machine",
        ["view", "setup", "calls", "vs stock", "vs multidb", "steps", "vs stock", "vs multidb"],
        rows,
    )


#: Set in the environment of the process that ``instructions()`` runs under callgrind.
CHILD = "DJANGO_SCALE_BENCH_INSTRUCTIONS_CHILD"
#: ``DJANGO_SCALE_BENCH_REQUEST_ONLY=instructions`` runs the callgrind table alone (the time
#: tables take minutes and say nothing the instructions do not, on a shared machine);
#: ``=time`` the time tables alone (on an idle machine: callgrind's table takes a quarter hour).
ONLY = "DJANGO_SCALE_BENCH_REQUEST_ONLY"


def _order(names: list[str], round_: int) -> list[str]:
    """The setups in the order round *round_* runs them (rotated by one each round)."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def _instruction_segments(replica: str, rounds: int, requests: int) -> None:
    """(Under callgrind) run *rounds* rounds of *requests* requests per view and setup.

    Each measured cell lies between two boundaries, calls of ``getppid()``, before which
    callgrind dumps the counters of the calling thread (``--dump-before=getppid``): of each
    thread's dumps, every second one holds a cell. An async view's ORM calls run in asgiref's
    one thread for sync code, which marks the boundaries of its own cells too. The setups take
    turns within each round, in an order rotated from round to round, so that whatever drifts
    in the process over a run (caches filling, the connections' state) drifts under every
    setup alike, and the parent takes the median over rounds. Before each cell a few requests
    settle the setup after the switch of settings, and a full collection and ``gc.freeze()``
    leave the collector nothing older to scan, so that no setup pays for the heap the others
    built.
    """
    loop = asyncio.new_event_loop()
    mark_orm_thread = sync_to_async(os.getppid)
    configs = setups(replica)
    names = list(configs)
    try:
        for _label, url, is_async in VIEWS:
            clients: dict[str, tuple[Client, AsyncClient]] = {}
            # Every setup warmed up before any is measured: each then runs with the same
            # connection objects initialized in its threads (Django resets and checks each one
            # at every request's start and end), whatever order the setups take.
            for name, options in configs.items():
                _reset_multidb()
                with override_settings(**options):
                    client, aclient = clients[name] = (Client(), AsyncClient())
                    _check_routing(name, client, url.replace("/async/", "/sync/"), replica)
                    if is_async:
                        loop.run_until_complete(_many(aclient, url, 20))
                    else:
                        for _ in range(20):
                            client.get(url)
            for round_ in range(rounds):
                for name in _order(names, round_):
                    _reset_multidb()
                    with override_settings(**configs[name]):
                        client, aclient = clients[name]
                        if is_async:
                            loop.run_until_complete(_many(aclient, url, 3))
                        else:
                            for _ in range(3):
                                client.get(url)
                        gc.collect()
                        gc.freeze()
                        os.getppid()
                        if is_async:
                            loop.run_until_complete(mark_orm_thread())
                            loop.run_until_complete(_many(aclient, url, requests))
                            loop.run_until_complete(mark_orm_thread())
                        else:
                            for _ in range(requests):
                                client.get(url)
                        os.getppid()
                    gc.unfreeze()
    finally:
        loop.run_until_complete(sync_to_async(connections.close_all)())
        loop.close()


async def _many(client: AsyncClient, url: str, count: int) -> None:
    for _ in range(count):
        response = await client.get(url)
        assert response.status_code == 200, response


def _segments(directory: str) -> dict[int, list[int]]:
    """Each thread's measured segments, in order: the instructions of every second dump."""
    dumps: dict[int, list[tuple[int, int]]] = {}
    for file in Path(directory).glob("cg.*"):
        text = file.read_text()
        if "Trigger: --dump-before=getppid" not in text:
            continue  # the dumps at exit
        found = [re.search(pattern, text, re.MULTILINE) for pattern in PARTS]
        part, thread, summary = (int(match.group(1)) for match in found if match is not None)
        dumps.setdefault(thread, []).append((part, summary))
    return {thread: [cost for _, cost in sorted(found)][1::2] for thread, found in dumps.items()}


#: The part number, thread and instruction count of a callgrind dump.
PARTS = (r"^part: (\d+)", r"^thread: (\d+)", r"^(?:summary|totals): (\d+)")

#: Per view: each setup's instructions per request in each round.
Cells = dict[str, dict[str, list[float]]]


def _cells(main: list[int], orm: list[int], names: list[str], rounds: int, requests: int) -> Cells:
    """Sort the cells' counts back into (view, setup, round), as _instruction_segments() ran them."""
    cells: Cells = {}
    main_cells, orm_cells = iter(main), iter(orm)
    for label, _, is_async in VIEWS:
        found: dict[str, list[float]] = {name: [] for name in names}
        cells[label] = found
        for round_ in range(rounds):
            for name in _order(names, round_):
                count = next(main_cells) + (next(orm_cells) if is_async else 0)
                found[name].append(count / requests)
    return cells


def _spread(values: list[float]) -> str:
    """The median of *values* (instructions), in thousands, and their range over the rounds."""
    return f"{statistics.median(values) / 1000:+,.1f}k ({min(values) / 1000:+,.1f} to {max(values) / 1000:+,.1f})"


def instructions(out: TextIO, replica: str, quick: bool) -> None:
    """Count the CPU instructions of a request in each setup (sync and async), under callgrind.

    Unlike time, the count does not move with what else the machine does (the database servers
    are other processes and are not counted): it measures the CPU cost each setup adds to a
    request in this process, which the time tables on a shared machine blur by several percent.
    It counts the thread that serves the request and, for an async view, asgiref's thread
    that runs its ORM calls; not the monitors' and the watchdog's threads, whose work goes by
    the clock (a probe per interval, a look per tick), not by request.

    The setups take turns in rounds (:func:`_instruction_segments`); each figure is the median
    over the rounds, and a difference between two setups is the median of their differences
    round by round, with its range over the rounds: the last table gives django-scale's cost
    minus django-multidb-router's directly.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        out.write("\n(Instructions per request: valgrind is not installed; apt-get install valgrind.)\n")
        return
    rounds, requests = (6, 15) if quick else (12, 40)
    with tempfile.TemporaryDirectory() as directory:
        rerun_under_callgrind(valgrind, directory, {CHILD: f"{rounds},{requests}"})
        segments = _segments(directory)
    main = segments.pop(1)
    orm = next(iter(segments.values())) if segments else []
    assert len(segments) == 1, f"one thread for sync code expected, found the dumps of {len(segments)}"
    names = list(setups(replica))
    assert len(main) == len(VIEWS) * len(names) * rounds == 2 * len(orm), (len(main), len(orm))
    cells = _cells(main, orm, names, rounds, requests)
    rows: list[list[object]] = []
    gaps: list[list[object]] = []
    for label, _, _ in VIEWS:
        found = cells[label]
        stock, anchor = found[STOCK], found[MULTIDB]
        for name, values in found.items():
            over = [a - b for a, b in zip(values, stock, strict=True)]
            rows.append(
                [
                    label,
                    name,
                    f"{statistics.median(values) / 1000:,.1f}k",
                    _spread(over),
                    f"{statistics.median(a / b for a, b in zip(values, stock, strict=True)):.3f}x",
                    f"{statistics.median(a / b for a, b in zip(values, anchor, strict=True)):.3f}x",
                ]
            )
        gaps.append([label, _spread([a - b for a, b in zip(found[SCALE], anchor, strict=True)])])
    print_table(
        out,
        f"CPU instructions per request in this process (callgrind; {rounds} rounds of {requests} requests per "
        "cell, the setups taking turns; the request's thread, and for async views also asgiref's thread for "
        "sync code): medians over the rounds, and the range over the rounds",
        ["view", "setup", "instructions", "vs stock (range)", "vs stock", "vs multidb"],
        rows,
    )
    print_table(
        out,
        "django-scale (both) minus django-multidb-router, instructions per request: median of the "
        "rounds' differences (range over the rounds); negative is cheaper",
        ["view", "django-scale - multidb"],
        gaps,
    )
