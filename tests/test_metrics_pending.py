"""Requests written in batches (django_scale.metrics.pending): nothing lost, nothing counted twice.

A request's end keeps its figures in its process; they reach the host's file in a batch of
``METRICS_BATCH`` requests (written by the request that fills it), a second after the last
write (by the process's timer thread), at the process's exit, before a read in the process,
and when the settings change. The file is read here through a second mapping, as another process (the
export of another worker, ``scale_status``) reads it: it sees only what was written.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.urls import ResolverMatch
from support import recording_metrics, wait_until

from django_scale import metrics
from django_scale.conf import conf
from django_scale.metrics import recording
from django_scale.metrics.pending import Pending
from django_scale.metrics.store import SlotStore
from django_scale.testing import override_scale_settings

from harness import free_port

FORK = multiprocessing.get_context("fork")
ROUTE = "request\x1fbatched\x1fGET"
TALLY = "requests\x1fbatched\x1fGET\x1f2xx"


def request_of(route: str = "batched") -> HttpRequest:
    request = RequestFactory().get(f"/{route}/")
    request.resolver_match = ResolverMatch(lambda request: None, (), {}, url_name=route, route=f"{route}/")
    return request


def view(request: HttpRequest) -> HttpResponse:
    return HttpResponse("")


def written(directory: str | Path) -> tuple[int, int]:
    """The route's request count and 2xx tally in the file, read through a mapping of its own."""
    slots, series, memory = conf.METRICS_SLOTS, conf.METRICS_SERIES, conf.METRICS_MEMORY
    reader = SlotStore(directory, slots, series, memory)
    try:
        snapshot = reader.snapshot()
    finally:
        reader.release()
    return snapshot.totals.get(ROUTE, (0, 0.0))[0], snapshot.counters.get(TALLY, 0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SlotStore]:
    """Request metrics on, ``METRICS_BATCH`` 4, and writes by the batch's size only (not by the clock)."""
    pending = recording._pending
    with override_scale_settings(METRICS_BATCH=4), recording_metrics(str(tmp_path)) as recording_store:
        pending.interval = 3600.0
        metrics.flush()  # the timer's next write in an hour
        try:
            yield recording_store
        finally:
            pending.interval = Pending.interval
            pending.due = 0.0


def test_requests_reach_the_file_a_batch_at_a_time(store: SlotStore, tmp_path: Path) -> None:
    middleware = metrics.MetricsMiddleware(view)
    for _ in range(3):
        middleware(request_of())
    assert written(tmp_path) == (0, 0)  # in this process's batch, not yet in the file
    middleware(request_of())  # the fourth: METRICS_BATCH
    assert written(tmp_path) == (4, 4)
    for _ in range(5):
        middleware(request_of())
    assert written(tmp_path) == (8, 8)
    # A read in this process writes its batch first: the ninth request is there.
    assert store.snapshot().totals[ROUTE][0] == 9
    assert written(tmp_path) == (9, 9)
    assert metrics.flush() == 0


def test_the_timer_writes_a_batch_no_request_ended(tmp_path: Path) -> None:
    # In a process of its own: the timer thread is per process.
    done = FORK.Queue()

    def worker() -> None:
        with override_scale_settings(METRICS_BATCH=100), recording_metrics(str(tmp_path)):
            # The timer's write three seconds after the first: well after the first reading.
            recording._pending.interval = 3.0
            middleware = metrics.MetricsMiddleware(view)
            for _ in range(5):  # the first writes at once and starts the timer; four wait
                middleware(request_of())
            done.put(written(tmp_path))
            wait_until(lambda: written(tmp_path) == (5, 5), "the timer's write", timeout=10)
            done.put(written(tmp_path))

    process = FORK.Process(target=worker)
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert done.get(timeout=5) == (1, 1)
    assert done.get(timeout=5) == (5, 5)


def test_a_forked_child_writes_none_of_its_parents_requests(store: SlotStore, tmp_path: Path) -> None:
    middleware = metrics.MetricsMiddleware(view)
    for _ in range(3):
        middleware(request_of())

    def child() -> None:
        for _ in range(2):
            middleware(request_of())
        metrics.flush()  # (multiprocessing's child ends with os._exit: no exit handlers)

    process = FORK.Process(target=child)
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert written(tmp_path) == (2, 2)  # the child's two, not the parent's three again
    assert metrics.flush() == 3
    assert written(tmp_path) == (5, 5)


def test_a_settings_change_writes_the_batch_to_the_store_it_ran_under(
    store: SlotStore, tmp_path: Path
) -> None:
    middleware = metrics.MetricsMiddleware(view)
    for _ in range(3):
        middleware(request_of())
    other = tmp_path / "other"
    with override_scale_settings(METRICS_DIR=str(other), METRICS_BATCH=4):
        assert written(tmp_path) == (3, 3)
        middleware(request_of())
        assert written(other) == (1, 1)
    assert written(tmp_path) == (3, 3)


def test_a_write_that_fails_is_logged_and_the_response_still_served(
    store: SlotStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    middleware = metrics.MetricsMiddleware(view)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with override_scale_settings(METRICS_DIR=str(blocked / "metrics")), caplog.at_level(logging.ERROR):
        response = middleware(request_of())
    assert response.status_code == 200
    assert "could not write this process's pending request metrics" in caplog.text


def test_requests_of_two_minutes_count_in_their_own_minutes(store: SlotStore) -> None:
    minute = 29_000_000
    current = recording._blank.copy()
    match = request_of().resolver_match
    # Requests end on the monotonic clock; these ended at :59.5, :59.9 and :00.2 of the wall clock.
    offset = time.time() - time.perf_counter()
    ends = [minute * 60 + 59.5 - offset, minute * 60 + 59.9 - offset, minute * 60 + 60.2 - offset]
    recording._write([(match, "GET", None, 200, end - 0.01, end, current, None) for end in ends])
    history = store.history([ROUTE], now=minute * 60 + 61)[ROUTE]
    assert {at: sketch.count for at, sketch in history.items()} == {minute: 2, minute + 1: 1}


APP = """
import os

import django
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

settings.configure(
    DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, DATABASES={}, SECRET_KEY="x" * 50,
    MIDDLEWARE=["django_scale.metrics.MetricsMiddleware"],
    DJANGO_SCALE={"METRICS_DIR": METRICS_DIR, "METRICS_SLOTS": 8, "METRICS_SERIES": 64, "METRICS_MEMORY": 1},
)
django.setup()


def batched(request):
    return HttpResponse(str(os.getpid()))


urlpatterns = [path("batched/", batched, name="batched")]

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
"""


@pytest.mark.parametrize("stop", ["max-requests", "SIGTERM"])
def test_gunicorn_workers_that_exit_write_their_batch(tmp_path: Path, stop: str) -> None:
    # Recycled by --max-requests, or stopped with the server: a worker exits through
    # SystemExit, and its exit writes the requests of its last second.
    directory = tmp_path / "metrics"
    (tmp_path / "tinyapp.py").write_text(f"METRICS_DIR = {str(directory)!r}\n" + textwrap.dedent(APP))
    port = free_port()
    recycle = ["--max-requests", "5"] if stop == "max-requests" else []
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
         "--chdir", str(tmp_path), *recycle, "tinyapp:application"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: accepts(port), "gunicorn listening", timeout=60)
        workers: set[bytes] = set()
        for _ in range(40):  # each answered, none retried: the file must hold exactly 40
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/batched/", timeout=30) as response:
                assert response.status == 200
                workers.add(response.read())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    snapshot = SlotStore(directory, 8, 64, 1).snapshot()
    assert snapshot.totals[ROUTE][0] == 40
    assert snapshot.counters[TALLY] == 40
    assert len(list(directory.iterdir())) == 1
    if stop == "max-requests":
        assert len(workers) >= 8  # 40 requests, 5 per worker: each recycled worker wrote its last batch


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_the_store_of_get_store_writes_the_batch_before_a_read(store: SlotStore, tmp_path: Path) -> None:
    middleware = metrics.MetricsMiddleware(view)
    middleware(request_of())
    assert written(tmp_path) == (0, 0)
    assert sum(sketch.count for sketch in metrics.get_store().history([ROUTE])[ROUTE].values()) == 1
    assert written(tmp_path) == (1, 1)
