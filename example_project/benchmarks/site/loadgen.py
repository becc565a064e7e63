"""The smallest open-loop HTTP/1.1 load generator, and its closed-loop capacity mode.

Open loop: request *i* is due at ``t0 + i / rate`` (a uniform schedule: fixed intervals, no
randomness), whatever happened to the requests before it. When it is due and no connection
is idle, another is opened; the generator never waits for a connection to come free. Latency
is measured from the request's *intended* send time, not from when it went out, so a server
that stalls is charged for every request that should have been sent during the stall
(coordinated omission corrected). A generator that falls behind its own schedule is charged
too: its lateness shows as latency, never hidden.

Capacity (``capacity_search``): the highest fixed rate whose p99 stays under :data:`P99_LIMIT`
without errors, found by a few open-loop steps.

Closed loop (``closed_loop``): *connections* clients each send their next request as soon as
the last one answered, for a fixed time: the capacity of the server, and the naive latency
figure (a stall shows as one slow request per connection, however long it lasts).

Every request carries ``X-Request-Start: t=<µs>``, the wall-clock time it went out on the wire,
as a proxy in front of the app server would send it: ``MetricsMiddleware`` records the time from
it to the request's start in Django as the queue time, so that the server's latency plus queue
time and the generator's figure measure the same span (same clock, same machine).

Each request is recorded (:class:`Record`): page name, intended time, start, end, status and
bytes received; percentiles are exact, from the records (nearest rank).

A request may come from a user (:class:`Browser`): the user's cookies go with it, what its
answer sets is kept, and a redirect it answers can be followed at once with a GET, recorded as
a request of its own (due the instant the redirect arrived), as a browser follows a form's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "P99_LIMIT",
    "Browser",
    "Record",
    "Request",
    "capacity_search",
    "closed_loop",
    "open_loop",
    "percentile",
    "summarise",
]

#: A request not answered within this many seconds is recorded with status 0 (an error).
TIMEOUT = 30.0
#: Capacity is the highest fixed rate whose p99 (from the intended send times) is under this.
P99_LIMIT = 1.0


class Browser:
    """One user's cookies, kept as a browser keeps them: each answer's ``Set-Cookie`` stored
    (replaced, or removed by ``Max-Age=0``, an empty value or a past ``Expires``) until it
    expires, and sent back with the user's next requests.

    Read-your-writes lives in these cookies: django-scale's write position, and
    django-multidb-router's pin of the user's reads to the primary for 15 s after a write.
    A generator that drops them measures neither. Thread-safe (the canary runs in a thread).
    """

    def __init__(self, cookies: dict[str, str] | None = None) -> None:
        #: The cookies it starts with (a login's session), and has again after :meth:`reset`.
        self.initial = dict(cookies or {})
        self._lock = threading.Lock()
        self._cookies: dict[str, tuple[str, float]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every cookie but the initial ones (a new phase's users start afresh)."""
        with self._lock:
            self._cookies = {name: (value, math.inf) for name, value in self.initial.items()}

    def get(self, name: str, default: str = "") -> str:
        """The value of the live cookie *name*, or *default*."""
        value, expires = self._cookies.get(name, (default, math.inf))
        return value if expires > time.time() else default

    def header(self) -> str:
        """The ``Cookie`` header's value: every live cookie."""
        now = time.time()
        with self._lock:
            return "; ".join(
                f"{name}={value}" for name, (value, expires) in self._cookies.items() if expires > now
            )

    def take(self, set_cookies: Sequence[str]) -> None:
        """Keep what the ``Set-Cookie`` header values *set_cookies* set."""
        now = time.time()
        for header in set_cookies:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(header)
            except CookieError:
                continue
            for name, morsel in jar.items():
                expires = _expiry(morsel["max-age"], morsel["expires"], now)
                with self._lock:
                    if not morsel.value or expires <= now:
                        self._cookies.pop(name, None)
                    else:
                        self._cookies[name] = (morsel.value, expires)


def _expiry(max_age: str, expires: str, now: float) -> float:
    """When a cookie expires (``time.time()``; inf for the session): ``Max-Age`` first, then
    ``Expires``; a malformed attribute is ignored, as RFC 6265 has browsers do."""
    with contextlib.suppress(ValueError):
        if max_age:
            return now + int(max_age)
    with contextlib.suppress(ValueError, TypeError):
        if expires:
            return parsedate_to_datetime(expires).timestamp()
    return math.inf


@dataclass(frozen=True)
class Request:
    """One HTTP request to send: *name* is the page it counts under."""

    name: str
    path: str
    method: str = "GET"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    #: The user who sends it: their cookies go with it (taken when it goes out), and what its
    #: answer sets is kept for their next requests. None: no cookies, nothing kept.
    browser: Browser | None = None
    #: Follow a redirect answer at once with a GET of its ``Location``, from the same browser,
    #: recorded as its own request under this page name (intended at the instant the redirect
    #: arrived): as a browser does after a form's POST. None: a redirect is not followed.
    redirect_as: str | None = None

    def encode(self, host: str, sent: float | None = None) -> bytes:
        """Return the request as bytes on the wire (HTTP/1.1, keep-alive).

        *sent*, a ``time.time()``, goes out as ``X-Request-Start: t=<microseconds>``.
        """
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
        if sent is not None:
            lines.append(f"X-Request-Start: t={round(sent * 1_000_000)}")
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.browser is not None and (cookies := self.browser.header()):
            lines.append(f"Cookie: {cookies}")
        if self.body or self.method != "GET":
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass
class Record:
    """What happened to one request. Times are ``time.monotonic()`` seconds."""

    name: str
    intended: float
    start: float
    end: float
    #: The HTTP status, or 0 for no answer (refused, reset, timed out, malformed).
    status: int
    bytes: int
    #: When the request went out on the wire, once its connection was open: the instant its
    #: ``X-Request-Start`` stamps (*start* where it never went out).
    sent: float = math.nan

    @property
    def latency(self) -> float:
        """Seconds from the intended send time to the last byte of the answer."""
        return self.end - self.intended

    @property
    def service_time(self) -> float:
        """Seconds from the actual send time to the last byte (what a closed loop measures)."""
        return self.end - self.start

    @property
    def wire_time(self) -> float:
        """Seconds from the request on the wire to the last byte: the span of its ``X-Request-Start``,
        without opening the connection (one per request under gunicorn's sync workers)."""
        return self.end - self.sent


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


@dataclass
class _Pool:
    """Connections to one server: idle ones are reused, a new one opened when none is idle."""

    host: str
    port: int
    idle: list[_Connection] = field(default_factory=list)
    opened: int = 0

    async def take(self) -> _Connection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.reader.at_eof():
                return connection
            # The server closed it while it was idle: not this request's failure.
            connection.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1
        return _Connection(reader, writer)

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


@dataclass(frozen=True)
class _Answer:
    status: int
    size: int
    keep_alive: bool
    set_cookies: tuple[str, ...] = ()
    location: str = ""


async def _read_response(reader: asyncio.StreamReader) -> _Answer:
    """Read one response: its status, body bytes, whether the connection stays open, the
    ``Set-Cookie`` values and the ``Location``."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    set_cookies = []
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            name = name.strip().lower()
            headers[name] = value.strip()
            if name == "set-cookie":
                set_cookies.append(value.strip())
    # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it.
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if lines[0].startswith("HTTP/1.1") else connection == "keep-alive"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        size = 0
        while True:
            chunk = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if chunk:
                size += len(await reader.readexactly(chunk))
            await reader.readexactly(2)
            if not chunk:
                break
    elif "content-length" in headers:
        size = len(await reader.readexactly(int(headers["content-length"])))
    else:
        # No length: the body ends when the server closes the connection.
        size, keep_alive = len(await reader.read()), False
    return _Answer(status, size, keep_alive, tuple(set_cookies), headers.get("location", ""))


async def _exchange(pool: _Pool, request: Request, times: list[float]) -> _Answer:
    """Send *request* and read its answer; append to *times* when it went out and when the
    last byte came in (taken there: closing the connection is the generator's own work).
    The request's browser keeps the cookies the answer sets."""
    connection = await pool.take()
    try:
        times.append(time.monotonic())
        connection.writer.write(request.encode(pool.host, time.time()))
        await connection.writer.drain()
        answer = await _read_response(connection.reader)
        times.append(time.monotonic())
    except BaseException:
        connection.close()
        raise
    if answer.keep_alive:
        pool.idle.append(connection)
    else:
        connection.close()
    if request.browser is not None:
        request.browser.take(answer.set_cookies)
    return answer


async def _send(pool: _Pool, request: Request, intended: float, records: list[Record]) -> None:
    start = time.monotonic()
    times: list[float] = []
    answer: _Answer | None = None
    with contextlib.suppress(
        OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError
    ):
        answer = await asyncio.wait_for(_exchange(pool, request, times), TIMEOUT)
    sent = times[0] if times else start
    end = times[1] if len(times) > 1 else time.monotonic()
    status, size = (answer.status, answer.size) if answer is not None else (0, 0)
    records.append(Record(request.name, intended, start, end, status, size, sent))
    if answer is not None and request.redirect_as and 300 <= answer.status < 400 and answer.location:
        # The browser follows at once: the GET is due the instant the redirect arrived.
        path = urlsplit(answer.location)._replace(scheme="", netloc="").geturl() or "/"
        await _send(pool, Request(request.redirect_as, path, browser=request.browser), end, records)


#: Sends one request due at an intended time and records it: what a load's schedule calls.
Send = Callable[[Request, float], Awaitable[None]]


async def _load(host: str, port: int, schedule: Callable[[Send], Awaitable[None]]) -> list[Record]:
    """Run *schedule* with a sender on one connection pool; return the records of what it sent.

    The one send path of both loops: they differ only in when they call ``send``.
    """
    pool = _Pool(host, port)
    records: list[Record] = []

    async def send(request: Request, intended: float) -> None:
        await _send(pool, request, intended, records)

    try:
        await schedule(send)
    finally:
        pool.close()
    return records


def open_loop(
    host: str, port: int, requests: Callable[[int], Request], *, rate: float, duration: float
) -> list[Record]:
    """Send ``rate * duration`` requests at fixed intervals; ``requests(i)`` gives the i-th.

    Every request is recorded, latency from its intended send time (see the module's docstring).
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("open_loop() needs a positive rate and duration")
    count = max(1, round(rate * duration))

    async def uniform(send: Send) -> None:
        tasks: set[asyncio.Task[None]] = set()
        t0 = time.monotonic() + 0.05
        for i in range(count):
            intended = t0 + i / rate
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # Never waits for an answer: the request goes out on its own task.
            task = asyncio.create_task(send(requests(i), intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)

    return asyncio.run(_load(host, port, uniform))


def closed_loop(
    host: str, port: int, requests: Callable[[int], Request], *, connections: int, duration: float
) -> list[Record]:
    """Send requests on *connections* concurrent clients, each as fast as answers come back."""
    if connections < 1 or duration <= 0:
        raise ValueError("closed_loop() needs at least one connection and a positive duration")
    sent = 0

    async def clients(send: Send) -> None:
        deadline = time.monotonic() + duration

        async def client() -> None:
            nonlocal sent
            while time.monotonic() < deadline:
                i, sent = sent, sent + 1
                # The closed loop's "intended" time is when it sent: what naive tools measure.
                await send(requests(i), time.monotonic())

        await asyncio.gather(*(client() for _ in range(connections)))

    return asyncio.run(_load(host, port, clients))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the exact *fraction* percentile of *values* (nearest rank), or NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarise(records: Sequence[Record], duration: float | None = None) -> dict[str, float]:
    """Return count, errors, throughput, p50/p99/p99.9/max latency and send lag (s) of *records*.

    Errors are status 0 and 5xx answers. Throughput is answered requests per second over
    *duration*, or over the span of the records.
    """
    latencies = [record.latency for record in records]
    if duration is None and records:
        duration = max(r.end for r in records) - min(r.intended for r in records)
    ok = sum(1 for record in records if 0 < record.status < 500)
    return {
        "requests": len(records),
        "errors": len(records) - ok,
        "throughput": ok / duration if duration else 0.0,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "p99.9": percentile(latencies, 0.999),
        "max": max(latencies, default=math.nan),
        # How late the generator itself sent (open loop): high, it fell behind its schedule
        # (a busy machine), and the latencies include that.
        "send_lag_p99": percentile([record.start - record.intended for record in records], 0.99),
    }


def next_rate(start: float, passed: float | None, failed: float | None) -> float:
    """The next rate the capacity search tries, given the highest that passed and lowest that failed.

    From *start* (the closed loop's throughput) it climbs by half while every step passes and
    falls by 40 % while every step fails; once it has one of each, it bisects (geometrically).
    """
    if passed is None and failed is None:
        return start
    if failed is None:
        assert passed is not None
        return passed * 1.5
    if passed is None:
        return failed * 0.6
    return math.sqrt(passed * failed)


def capacity_search(
    load: Callable[[float], list[Record]], start: float, steps: int, step_seconds: float
) -> dict[str, Any]:
    """Return the highest of *steps* open-loop rates whose p99 < :data:`P99_LIMIT`, no errors.

    ``load(rate)`` runs one open-loop step at *rate* and returns its records. The result has
    ``rate`` (0.0 when every step failed) and ``steps``: each step's rate, p99, errors and verdict.
    """
    passed: float | None = None
    failed: float | None = None
    tried = []
    for _ in range(steps):
        rate = max(0.1, round(next_rate(start, passed, failed), 2))
        figures = summarise(load(rate), step_seconds)
        ok = figures["p99"] < P99_LIMIT and figures["errors"] == 0
        tried.append({"rate": rate, "p99": figures["p99"], "errors": figures["errors"], "passed": ok})
        if ok:
            passed = max(passed or 0.0, rate)
        else:
            failed = rate if failed is None else min(failed, rate)
    return {"rate": passed or 0.0, "steps": tried}
