"""``bench site``'s fault machinery: the canary's stale-read test, the fault window, recovery.

The canary runs against a small HTTP server that behaves as a replicated site does: a read
without the read-your-writes cookie the write set may miss the write (the replica lags), one
with it does not. A stale page is forced, and must be counted.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "example_project"))

from benchmarks.site.faults import Canary, Fault, baselines, recovery_seconds, run_fault, timeline  # noqa: E402
from benchmarks.site.loadgen import (
    Browser,  # noqa: E402
    Record,  # noqa: E402
)


class _Site:
    """What the fake server shows: the comments on the primary, and on a lagging replica."""

    def __init__(self) -> None:
        self.primary: list[str] = []
        self.replica: list[str] = []
        #: Every read served by the replica, read-your-writes cookie or not (a broken router).
        self.force_stale = False
        self.fail = False


def _handler(site: _Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, body: bytes = b"", cookie: str = "") -> None:
            self.send_response(status)
            if cookie:
                self.send_header("Set-Cookie", cookie)
            if status == 303:
                self.send_header("Location", "/articles/canary/")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            if site.fail or "sessionid=s" not in self.headers.get("Cookie", ""):
                self._answer(500)
                return
            site.primary.append(form["body"][0])
            self._answer(303, cookie="ryw=42; Path=/")

        def do_GET(self) -> None:
            pinned = "ryw=42" in self.headers.get("Cookie", "") and not site.force_stale
            comments = site.primary if pinned else site.replica
            self._answer(200, "".join(f"<p>{c}</p>" for c in comments).encode())

    return Handler


@pytest.fixture
def site() -> Iterator[tuple[_Site, int]]:
    state = _Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_canary_reads_its_writes_through_the_cookie_and_counts_a_forced_stale_read(
    site: tuple[_Site, int],
) -> None:
    state, port = site
    canary = Canary("127.0.0.1", port, Browser({"sessionid": "s", "csrftoken": "t"}), "canary")
    # The replica never has the comments: only the cookie the POST set keeps the reads fresh.
    assert canary.round(1) == "ok"
    assert canary.browser.get("ryw") == "42"
    assert state.primary == [f"canary {canary.marker} 1"] and state.replica == []
    state.force_stale = True
    assert canary.round(2) == "stale"
    state.force_stale = False
    state.fail = True
    assert canary.round(3) == "error"
    assert [what for _, what in canary.errors] == ["POST answered 500"]


def test_the_canary_thread_records_each_round(site: tuple[_Site, int]) -> None:
    state, port = site
    canary = Canary("127.0.0.1", port, Browser({"sessionid": "s", "csrftoken": "t"}), "canary", interval=0.01)
    canary.start()
    time.sleep(0.3)
    state.force_stale = True
    time.sleep(0.3)
    canary.stop()
    kinds = [kind for _, kind in canary.events]
    assert kinds[0] == "ok" and kinds[-1] == "stale"
    assert set(kinds) == {"ok", "stale"}
    assert canary.count("stale", 0.0, time.monotonic() + 1) == kinds.count("stale")


def _records(
    start: float, end: float, rate: float, latency: float, status: int = 200, name: str = "page"
) -> list[Record]:
    count = round((end - start) * rate)
    return [
        Record(name, start + i / rate, start + i / rate, start + i / rate + latency, status, 1)
        for i in range(count)
    ]


def test_recovery_is_when_everything_later_is_back_under_the_limit() -> None:
    # Slow for 1.2 s after the recovery at t=10, one error window at 2.0-2.5, then fine.
    records = (
        _records(10.0, 11.2, 100, 0.5)
        + _records(11.2, 12.0, 100, 0.01)
        + _records(12.0, 12.5, 100, 0.01, status=502)
        + _records(12.5, 15.0, 100, 0.01)
    )
    assert recovery_seconds(records, 10.0, {"all": 0.1}, 15.0) == pytest.approx(2.5)
    # Never back: the last window is slow.
    assert recovery_seconds(_records(10.0, 15.0, 100, 0.5), 10.0, {"all": 0.1}, 15.0) is None
    # Never hurt: recovered at once.
    assert recovery_seconds(_records(10.0, 15.0, 100, 0.01), 10.0, {"all": 0.1}, 15.0) == 0.0
    rows = timeline(records, 10.0, 15.0)
    assert len(rows) == 10
    assert rows[0]["p99"] == pytest.approx(0.5) and rows[4]["errors"] == 50


def test_recovery_holds_each_page_to_its_own_baseline() -> None:
    # After the recovery at t=10: the front page fast throughout, one admin search per second
    # at its usual 80 ms, and the front page slow (60 ms) until t=12.
    searches = _records(10.0, 15.0, 1, 0.08, name="admin search")
    fast = _records(12.0, 15.0, 10, 0.005, name="front page")
    slow = _records(10.0, 12.0, 10, 0.06, name="front page")
    limits = {"all": 0.04, "front page": 0.02, "admin search": 0.2}
    # The front page is back under its limit at t=12; the searches never broke theirs.
    assert recovery_seconds(slow + fast + searches, 10.0, limits, 15.0) == pytest.approx(2.0)
    # Against the whole mix's limit alone, every search (the last at t=14) would count as the
    # site not recovered.
    assert recovery_seconds(fast + searches, 10.0, {"all": 0.04}, 14.5) is None
    assert recovery_seconds(fast + searches, 10.0, limits, 14.5) == 0.0
    # A page's own slowdown counts, however slow other pages are allowed to be.
    slow_search = _records(10.0, 15.0, 1, 0.5, name="admin search")
    assert recovery_seconds(fast + slow_search, 10.0, limits, 14.5) is None


def test_one_slow_request_of_the_ordinary_one_percent_does_not_hold_the_recovery_back() -> None:
    # 226 requests after the recovery at t=10, one of them (late) slow: the p99 from t=10 on is
    # under the limit, though the window holding the slow request alone is not.
    fast = _records(10.0, 14.5, 50, 0.01)
    late = [Record("page", 13.9, 13.9, 14.3, 200, 1)]
    assert recovery_seconds(fast + late, 10.0, {"all": 0.1}, 14.5) == 0.0
    # Three slow requests in the last second are not the ordinary tail: the site is back only
    # from where the slow ones are a small enough share.
    tail = [Record("page", 13.5 + i / 10, 13.5 + i / 10, 13.9 + i / 10, 200, 1) for i in range(3)]
    assert recovery_seconds(fast + tail, 10.0, {"all": 0.1}, 14.5) == pytest.approx(4.0)
    # Slow to the last request: never recovered (the time after the last request is no recovery).
    assert recovery_seconds(_records(10.0, 14.0, 50, 0.5), 10.0, {"all": 0.1}, 14.5) is None
    # A single failure after the recovery holds it back, however many requests succeed.
    failure = [Record("page", 12.0, 12.0, 12.01, 502, 1)]
    assert recovery_seconds(fast + failure, 10.0, {"all": 0.1}, 14.5) == pytest.approx(2.5)


def test_the_baseline_of_a_page_is_its_steady_or_alone_p99_whichever_is_higher() -> None:
    steady = {
        "all": {"p99": 0.02},
        "pages": {"front page": {"p99": 0.01}, "admin search": {"p99": 0.05}},
    }
    alone = {
        "front page": {"generator": {"p99": 0.004}},
        "admin search": {"generator": {"p99": 0.12}},
        "comment (POST)": {"generator": {"p99": 0.03}},
    }
    assert baselines(steady, alone) == {
        "all": 0.02,
        "front page": 0.01,
        "admin search": 0.12,
        "comment (POST)": 0.03,
    }


def test_a_fault_run_records_its_window_and_charges_what_happened_in_it() -> None:
    canary = Canary("127.0.0.1", 9, Browser({"sessionid": "s", "csrftoken": "t"}), "canary")
    broken = threading.Event()

    def inject() -> None:
        broken.set()
        canary.events.append((time.monotonic(), "stale"))

    fault = Fault("test fault", inject, broken.clear)

    def load(seconds: float) -> list[Record]:
        # A stand-in open loop: 502s while the fault lasts, as measured from outside.
        records: list[Record] = []
        origin = time.monotonic()
        while time.monotonic() < origin + seconds:
            now = time.monotonic()
            records.append(Record("page", now, now, now + 0.001, 502 if broken.is_set() else 200, 1))
            time.sleep(0.01)
        return records

    figures = run_fault(fault, load, canary, before=0.3, during=0.4, after=0.5, baseline_p99=0.01)
    window = figures["window"]
    assert 0.3 <= window["injected"] <= window["inject done"] < window["recovering"] <= window["recovered"]
    assert window["recovering"] - window["injected"] == pytest.approx(0.4, abs=0.05)
    assert figures["5xx"] >= 20 and figures["no answer"] == 0
    # Requests took a millisecond: none was in flight at the instant of the fault, or errored there.
    assert figures["in flight at the fault"] <= 1
    assert figures["errors in flight at the fault"] == 0
    assert figures["canary stale reads"] == 1
    assert figures["recovery seconds"] == 0.0
    assert any(row["errors"] for row in figures["timeline"])
