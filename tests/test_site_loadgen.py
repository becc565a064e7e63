"""``bench site``'s load generator, proved on a real gunicorn that is paused with SIGSTOP.

An open-loop generator charges a server stall to every request that was due during it
(latency from the intended send time); a closed loop records one slow request per
connection, however long the stall. The proof pauses gunicorn's master and workers for two
seconds in a run of each (marker ``once``: slow). The capacity search runs on a stand-in.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "example_project"))

from django_scale.metrics.recording import queue_seconds  # noqa: E402

from benchmarks.site.loadgen import (  # noqa: E402
    Browser,
    Record,
    Request,
    capacity_search,
    closed_loop,
    open_loop,
    percentile,
    summarise,
)

APP = """
def application(environ, start_response):
    body = b"ok " + environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""
#: Writes, per request, the X-Request-Start it got and when (its clock: the same machine's).
STAMPED_APP = """
import time

def application(environ, start_response):
    with open("stamps.log", "a") as log:
        log.write(f"{environ.get('HTTP_X_REQUEST_START', '-')} {time.time()!r}\\n")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
"""
PAUSE = 2.0
RATE = 100.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    yield from _serve(tmp_path, APP)


def _serve(tmp_path: Path, app: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    (tmp_path / "tinyapp.py").write_text(app)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "sync",
         "--bind", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "tinyapp:application"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_server(port, "gunicorn answering with 2 workers", lambda: len(_children(server.pid)) == 2)
        yield port, server
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_server(port: int, what: str, ready: Callable[[], bool] = lambda: True) -> None:
    """Wait until a server accepts connections on *port* and *ready* holds."""

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return ready()
        except OSError:
            return False

    wait_until(answers, what, timeout=60)


def _pause_during(server: subprocess.Popen[bytes], after: float) -> list[float]:
    """Stop gunicorn's master and workers *after* seconds from now, for PAUSE seconds, in a thread.

    Return a list that then holds the (monotonic) times it stopped and resumed.
    """
    window: list[float] = []
    pids = [server.pid, *_children(server.pid)]

    def pause() -> None:
        time.sleep(after)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        window.append(time.monotonic())
        time.sleep(PAUSE)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        window.append(time.monotonic())

    thread = threading.Thread(target=pause, daemon=True)
    thread.start()
    return window


def _request(i: int) -> Request:
    return Request("tiny", f"/page/{i}/")


def test_each_request_carries_its_send_time_in_the_format_metrics_middleware_reads(tmp_path: Path) -> None:
    """The server's latency + queue time spans what the generator measures: the stamp is the send time."""
    for port, _ in _serve(tmp_path, STAMPED_APP):
        before = time.time()
        records = open_loop("127.0.0.1", port, _request, rate=50.0, duration=1.0)
        after = time.time()
    lines = (tmp_path / "stamps.log").read_text().splitlines()
    assert len(records) == len(lines) == 50 and {record.status for record in records} == {200}
    # Each record knows when its request went out (after its connection opened): the instant
    # it stamped, and where its wire time, the span the server's figures cover, starts.
    assert all(record.start <= record.sent < record.end for record in records)
    longest = max(record.wire_time for record in records)
    for line in lines:
        header, arrived = line.split()
        assert header.startswith("t=") and header[2:].isdigit(), line
        sent = int(header[2:]) / 1e6
        assert before <= sent <= float(arrived) <= after, line
        # MetricsMiddleware's parser reads the same send time: the queue time it records.
        assert queue_seconds(header, float(arrived)) == pytest.approx(float(arrived) - sent, abs=1e-6)
        assert float(arrived) - sent <= longest


@pytest.mark.once
def test_open_loop_charges_a_stall_to_every_request_due_during_it(
    gunicorn: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, server = gunicorn
    window = _pause_during(server, after=1.5)
    records = open_loop("127.0.0.1", port, _request, rate=RATE, duration=5.0)
    stopped, resumed = window
    figures = summarise(records)
    assert len(records) == 500
    assert figures["errors"] == 0
    assert {record.status for record in records} == {200}
    # Every request due while gunicorn was stopped waited at least until it resumed.
    during = [record for record in records if stopped + 0.05 <= record.intended < resumed]
    assert len(during) >= RATE * PAUSE * 0.8
    for record in during:
        assert record.latency >= resumed - record.intended - 0.01, record
    # So the stall is in the percentiles: two seconds of a five-second run.
    assert figures["p99"] >= 1.0
    assert figures["max"] >= PAUSE * 0.9
    # The intended times are the fixed schedule, whatever the server did.
    intended = sorted(record.intended for record in records)
    assert max(b - a for a, b in zip(intended, intended[1:], strict=False)) == pytest.approx(
        1 / RATE, abs=1e-6
    )


@pytest.mark.once
def test_a_closed_loop_records_one_slow_request_per_connection(
    gunicorn: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """The naive measurement of the same stall: each client waits once, then carries on."""
    port, server = gunicorn
    window = _pause_during(server, after=1.5)
    records = closed_loop("127.0.0.1", port, _request, connections=2, duration=5.0)
    stopped, resumed = window
    slow = [record for record in records if record.latency >= 1.0]
    # The stall holds at most one request per connection: those in flight while it lasted.
    # (On a loaded machine a request outside it may pass 1 s as well: not the stall's.)
    stalled = [record for record in slow if record.start < resumed and record.end > stopped]
    assert 1 <= len(stalled) <= 2
    assert all(record.status == 200 for record in records)
    # No request was even sent while the server was stopped (after the first two).
    sent_during = [r for r in records if stopped + 0.05 <= r.start < resumed]
    assert sent_during == []
    # So its p99 hides the stall: the tiny app answers thousands of requests in the other 3 s.
    assert len(records) > 100 * len(slow)
    assert percentile([r.latency for r in records], 0.99) < 1.0


def _server_of_capacity(capacity: float, calls: list[float]) -> Callable[[float], list[Record]]:
    """A stand-in for one open-loop step on a server that keeps up with *capacity* requests/s.

    Above it the queue grows: the p99 passes a second. Each step's rate goes into *calls*.
    """

    def load(rate: float) -> list[Record]:
        calls.append(rate)
        latency = 0.02 if rate <= capacity else 1.5
        return [
            Record("page", i / rate, i / rate, i / rate + latency, 200, 10) for i in range(round(rate * 4))
        ]

    return load


def test_capacity_is_the_highest_rate_whose_p99_stays_under_a_second() -> None:
    calls: list[float] = []
    # The closed loop overstates it (start 50/s): the search comes down, then bisects.
    found = capacity_search(_server_of_capacity(37.0, calls), start=50.0, steps=6, step_seconds=4.0)
    assert calls[0] == 50.0
    assert calls[1] == pytest.approx(30.0)
    assert [step["passed"] for step in found["steps"]] == [rate <= 37.0 for rate in calls]
    assert found["rate"] == max(rate for rate in calls if rate <= 37.0)
    assert 33.0 <= found["rate"] <= 37.0
    # Every step after the first pair lies between the highest pass and the lowest failure.
    for i, rate in enumerate(calls[2:], start=2):
        assert max(r for r in calls[:i] if r <= 37.0) < rate < min(r for r in calls[:i] if r > 37.0)


def test_capacity_search_climbs_while_every_step_passes_and_errors_fail_a_step() -> None:
    calls: list[float] = []
    found = capacity_search(_server_of_capacity(1000.0, calls), start=10.0, steps=3, step_seconds=4.0)
    assert calls == [10.0, 15.0, 22.5]
    assert found["rate"] == 22.5

    def failing(rate: float) -> list[Record]:
        return [Record("page", 0.0, 0.0, 0.01, 503, 0)] * 10

    nothing = capacity_search(failing, start=10.0, steps=2, step_seconds=4.0)
    # Fast answers, but errors: no step passes, and the capacity is 0.
    assert [step["passed"] for step in nothing["steps"]] == [False, False]
    assert nothing["rate"] == 0.0


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_the_floor_splits_each_request_at_the_no_op_application(server: str) -> None:
    """The floor under each app server: every request answered, its service time split at the app."""
    from benchmarks.site.deploy import floor
    from benchmarks.site.pages import probe_floor

    with floor(server, workers=1) as running:
        figures = probe_floor(running, 1.0)
        arrivals = (running.log_dir / "arrivals.log").read_text().splitlines()
    assert figures["server"] == server and figures["errors"] == 0
    # One line per request, each stamped by the generator, paired with its record in order.
    assert figures["requests"] == len(arrivals) > 10
    assert all(line.startswith("t=") for line in arrivals)
    for key in ("p50", "p90", "p99"):
        before, after = figures["before the app"][key], figures["after the app"][key]
        assert 0 <= before <= figures["p99"] and 0 < after <= figures["p99"], (key, figures)
    assert figures["before the app"]["p50"] + figures["after the app"]["p50"] <= 2 * figures["p50"]
    # Opening the connection, before the request went out, is apart.
    assert 0 <= figures["connect"]["p50"] <= figures["connect"]["p99"]


def test_a_pooled_connection_the_server_closed_while_idle_is_not_reused() -> None:
    """uvicorn closes a keep-alive connection idle past its timeout: the next request opens another.

    Before, the generator wrote onto the closed connection and recorded a request with no answer
    (found by the ASGI run: uvicorn's default is 5 s, a phase of the quick run 8 s).
    """
    import asyncio

    from benchmarks.site.deploy import EXAMPLE_PROJECT, free_port
    from benchmarks.site.loadgen import _exchange, _Pool

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "floor:asgi", "--app-dir", str(EXAMPLE_PROJECT / "benchmarks" / "site"),
         "--port", str(port), "--timeout-keep-alive", "1", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_server(port, "uvicorn answering")

        times: list[list[float]] = [[], []]

        async def twice() -> tuple[Any, Any, int]:
            pool = _Pool("127.0.0.1", port)
            first = await _exchange(pool, Request("floor", "/"), times[0])
            await asyncio.sleep(2.5)  # the server closes the idle connection after 1 s
            second = await _exchange(pool, Request("floor", "/"), times[1])
            pool.close()
            return first, second, pool.opened

        first, second, opened = asyncio.run(twice())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert first.status == second.status == 200
    assert opened == 2
    # Each exchange noted when its request went out and when its last byte came in.
    assert all(len(pair) == 2 and pair[0] < pair[1] for pair in times)


class _Writes(BaseHTTPRequestHandler):
    """A site that pins a writer for a second: a POST sets ``pin=y; Max-Age=1`` and redirects
    to ``/read``, which answers whether the pin came back; ``/unpin`` removes it."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str]]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers.get("Cookie", "")))
        port = self.server.server_address[1]
        self._answer(
            303, (("Set-Cookie", "pin=y; Max-Age=1; Path=/"), ("Location", f"http://127.0.0.1:{port}/read"))
        )

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Cookie", "")))
        if self.path == "/unpin":
            self._answer(200, (("Set-Cookie", "pin=; Max-Age=0; Path=/"),))
        else:
            self._answer(200, body=b"pinned" if "pin=y" in self.headers.get("Cookie", "") else b"free")


@pytest.fixture
def writes_site() -> Iterator[int]:
    _Writes.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Writes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_browser_follows_a_writes_redirect_with_the_cookie_it_set(writes_site: int) -> None:
    """As a browser does: the redirect a POST answers is followed at once, recorded under its
    own name, and carries the cookie the POST set (read-your-writes rides on it)."""
    browser = Browser({"sessionid": "s"})
    write = Request(
        "write", "/write", method="POST", body=b"x=1", browser=browser, redirect_as="read after write"
    )
    records = closed_loop("127.0.0.1", writes_site, lambda i: write, connections=1, duration=0.2)
    names = [record.name for record in records]
    assert names[:2] == ["write", "read after write"]
    assert all(record.status in (303, 200) for record in records)
    assert ("/read", "sessionid=s; pin=y") in _Writes.seen
    # The first POST went out before any pin; the follow-up is due when the redirect arrived.
    assert _Writes.seen[0] == ("/write", "sessionid=s")
    first_read = records[1]
    assert first_read.intended == records[0].end
    # Sent alone, a write follows nothing.
    alone = closed_loop(
        "127.0.0.1",
        writes_site,
        lambda i: Request("write", "/write", method="POST"),
        connections=1,
        duration=0.1,
    )
    assert {record.name for record in alone} == {"write"}


def test_a_browser_forgets_a_cookie_when_it_expires_or_is_removed(writes_site: int) -> None:
    browser = Browser({"sessionid": "s"})
    open_loop("127.0.0.1", writes_site, lambda i: Request("write", "/write", method="POST", browser=browser),
              rate=10, duration=0.1)  # fmt: skip
    assert browser.get("pin") == "y"
    assert browser.header() == "sessionid=s; pin=y"
    wait_until(lambda: browser.get("pin") == "", timeout=5, what="the pin's Max-Age=1 to pass")
    assert browser.header() == "sessionid=s"
    browser.take(["pin=y; Max-Age=60"])
    open_loop(
        "127.0.0.1", writes_site, lambda i: Request("unpin", "/unpin", browser=browser), rate=10, duration=0.1
    )
    assert browser.header() == "sessionid=s"
    browser.take(["other=1; Expires=Thu, 01 Jan 1970 00:00:00 GMT", "kept=2; Path=/"])
    assert browser.header() == "sessionid=s; kept=2"
    # A malformed Max-Age or Expires is ignored (RFC 6265): the cookie lives for the session.
    browser.take(["odd=3; Max-Age=soon", "odder=4; Expires=someday"])
    assert browser.header() == "sessionid=s; kept=2; odd=3; odder=4"
    browser.reset()
    assert browser.header() == "sessionid=s"
