"""Small helpers shared by the test modules (the servers themselves are in harness.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from django_scale import metrics

import harness

T = TypeVar("T")


def break_replica_connection(connection: Any) -> None:
    """Break this thread's open replica *connection*, as a failing replica does.

    Directly connected, its server backend is terminated (``pg_terminate_backend``). Through
    PgBouncer that would break nothing the client sees (the pooler drops the dead server
    connection and serves the client's next query on another one), so there the client's own
    socket is shut down instead, as the replica guard's watchdog does: either way the next
    query on *connection* fails with a broken connection.
    """
    if harness.POOLER == "pgbouncer":
        fd = os.dup(connection.connection.fileno())
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    killer = connection.get_new_connection(connection.get_connection_params())
    killer.autocommit = True
    with killer.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    killer.close()


def counter(name: str) -> int:
    """Return the per-process counter *name* of :mod:`django_scale.metrics` (0 if unset)."""
    value = metrics.snapshot().get(name, 0)
    assert isinstance(value, int)
    return value


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float = 20.0,
    interval: float = 0.01,
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll *condition* every *interval* seconds until it returns a true value, and return it.

    Fail with *what* after *timeout* seconds (and what *explain* returns then).
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {explain()}" if explain else ""))
        time.sleep(interval)
    return value


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that uses this test run's databases and Redis."""
    import os
    from pathlib import Path

    from django.db import connections

    import harness

    def url(alias: str, server: harness.Postgres | None = None) -> str:
        s = connections[alias].settings_dict
        host, port = (server.host, server.port) if server else (s["HOST"], s["PORT"])
        return f"postgres://{s['USER']}:{s['PASSWORD']}@{host}:{port}/{s['NAME']}"

    services = harness.services()
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="settings",
        PYTHONPATH=str(Path(__file__).resolve().parent),
        DJANGO_SCALE_TEST_PRIMARY_URL=url("default"),
        DJANGO_SCALE_TEST_REPLICA_URL=url("replica"),
        DJANGO_SCALE_TEST_REDIS_URL=services.redis.url(),
        PYTHONDEVMODE="1",
    )
    if services.replica2 is not None:
        env["DJANGO_SCALE_TEST_REPLICA2_URL"] = url("replica2")
    pooler = services.pooler
    if pooler is not None:
        # The servers themselves, and the ports of this run's PgBouncers in front of them: the
        # child reaches PostgreSQL through the same PgBouncers (as the workers of a host share
        # theirs) rather than starting PgBouncers of its own in front of these.
        env.update(
            DJANGO_SCALE_TEST_PRIMARY_URL=url("default", pooler.direct_primary),
            DJANGO_SCALE_TEST_REPLICA_URL=url("replica", pooler.direct_replica),
            DJANGO_SCALE_TEST_PGBOUNCER_PORTS=",".join(map(str, pooler.ports)),
        )
        if pooler.direct_replica2 is not None:
            env["DJANGO_SCALE_TEST_REPLICA2_URL"] = url("replica2", pooler.direct_replica2)
    env.update(extra)
    return env


@contextlib.contextmanager
def swr_cache(param: str, location: str) -> Iterator[str]:
    """Use a fresh local-memory cache (*param* ``"locmem"``) or the suite's Redis (``"redis"``)
    as django-scale's cache; yield its alias."""
    from django.conf import settings
    from django.core.cache import caches
    from django.test.utils import override_settings

    from django_scale.testing import override_scale_settings

    if param == "locmem":
        locmem = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": location}
        with (
            override_settings(CACHES={**settings.CACHES, "locmem": locmem}),
            override_scale_settings(CACHE_ALIAS="locmem"),
        ):
            caches["locmem"].clear()
            yield "locmem"
    else:
        caches["default"].clear()
        yield "default"
        caches["default"].clear()


def log_in(client: Any, account: Any) -> None:
    """Log *client* in, and wait until every replica has the session (requests read it there)."""
    from django.contrib.sessions.models import Session

    from django_scale.conf import conf

    client.force_login(account)
    key = client.session.session_key
    # The session's final data, not only its row: login() saves the session twice (cycle_key()
    # inserts it, then the user is written into it), and a replica may have replayed only the
    # first save: its requests would then be anonymous.
    data = Session.objects.using(conf.PRIMARY).get(session_key=key).session_data
    for alias in conf.REPLICAS:
        wait_until(
            lambda alias=alias: (
                Session.objects.using(alias).filter(session_key=key, session_data=data).exists()
            ),
            "the session",
        )


def create_user(username: str, **extra: Any) -> Any:
    """Create a user, and wait until every replica has it (requests read users from them)."""
    from django.contrib.auth.models import User

    from django_scale.conf import conf

    created = User.objects.create_user(username, password="pw", **extra)
    for alias in conf.REPLICAS:
        wait_until(
            lambda alias=alias: User.objects.using(alias).filter(pk=created.pk).exists(), f"{alias} replays"
        )
    return created


class SilentServer:
    """A TCP server that accepts every connection and never answers: a hung Redis."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        #: The connections it accepted (and never answered).
        self.accepted: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-redis", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        """Stop accepting and close every connection: the clients' reads fail at once."""
        self._stopped.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self._listener.close()
        for connection in self.accepted:
            connection.close()


class SlowFirstAnswer:
    """A TCP relay to *port* that holds the first answer of the first connection *delay* seconds.

    A real server on a busy host whose first answer (connecting, loading the client) is late,
    then on time.
    """

    def __init__(self, port: int, delay: float) -> None:
        self._target, self._delay = port, delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._first = True
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, name="slow-first-answer", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, server]
            delay, self._first = (self._delay if self._first else 0.0), False
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, delay), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if delay:
                    time.sleep(delay)
                    delay = 0.0
                target.sendall(data)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


#: The token of the metrics export in the metrics tests.
METRICS_TOKEN = "t" * 40


def metrics_middleware() -> list[str]:
    """``MIDDLEWARE`` with ``MetricsMiddleware`` first and ``ScaleMiddleware`` right after it."""
    from django.conf import settings

    scale = "django_scale.middleware.ScaleMiddleware"
    return ["django_scale.metrics.MetricsMiddleware", scale, *[n for n in settings.MIDDLEWARE if n != scale]]


@contextlib.contextmanager
def recording_metrics(directory: str) -> Iterator[Any]:
    """Request metrics on, in a metrics file of the test's own under *directory*; yield the store."""
    from django.db import connections
    from django.test import override_settings

    from django_scale.metrics.recording import _wrap_connection, disable
    from django_scale.testing import override_scale_settings

    with (
        override_settings(ROOT_URLCONF="testapp.metrics_urls", MIDDLEWARE=metrics_middleware()),
        override_scale_settings(METRICS_DIR=directory, METRICS_TOKEN=METRICS_TOKEN),
    ):
        # A worker's connections open after its middleware is built, and MetricsMiddleware
        # wraps each as it opens; the suite's connections of this thread are open already (an
        # AsyncClient builds its middleware on another thread), so wrap them as a worker would.
        for open_connection in connections.all(initialized_only=True):
            _wrap_connection(connection=open_connection)
        try:
            yield metrics.get_store()
        finally:
            disable()
