"""The deployment ``bench site`` measures: the example project under gunicorn (or uvicorn), and Celery.

The PostgreSQL primary and its streaming replica are the ones this process's settings point
at (the test harness's, with ``DJANGO_SCALE_EXAMPLE_HARNESS=1``). :func:`deployment` starts,
for one configuration (``stock``, ``tuned``, ``scale``; see ``news.configs``):

* two Redis servers of its own, the cache and the Celery broker (:class:`RedisServer`: each a
  part that a fault can stop or freeze alone; and each configuration starts with an empty cache,
  as a fresh deployment does);
* the app server on a free local port (:data:`SERVERS`): gunicorn with sync workers serving
  ``newsroom.wsgi``, or, for the ASGI run, uvicorn's workers serving ``newsroom.asgi``;
* a real ``celery -A newsroom worker`` on the broker (django-scale's refills run there).

:func:`floor` serves a no-op application (:mod:`~benchmarks.site.floor`) under the same app
server, alone: what the server, the socket and the generator cost with no Django at all.

Both get the configuration through ``DJANGO_SCALE_EXAMPLE_CONFIG`` and the services through
the same environment variables the settings read; each runs in a process group of its own,
and leaving the ``with`` block, by return, error or Ctrl-C, stops both groups (SIGTERM, then
SIGKILL after a grace period), so that no process outlives the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SERVERS", "Deployment", "RedisServer", "deployment", "floor"]

EXAMPLE_PROJECT = Path(__file__).resolve().parent.parent.parent
#: Sync workers for a 2-core machine: one more than the cores, so a worker waiting on the
#: database does not leave a core idle.
WORKERS = 3
#: Seconds a process group has to exit on SIGTERM before it is killed.
GRACE = 10.0
#: The variables of this process that the children must not inherit: the harness (each child
#: would start services of its own) and the aliases `bench site` does not use.
DROPPED = (
    "DJANGO_SCALE_EXAMPLE_HARNESS",
    "REPLICA2_URL",
    "LEGACY_DATABASE_URL",
    "DJANGO_SETTINGS_MODULE",
    "DJANGO_SCALE_EXAMPLE_CACHE_TTL",
)
#: The app servers, each with the application it serves of the example project's: gunicorn's
#: sync workers (WSGI) and uvicorn's (ASGI; Django runs the sync views in a thread of each).
SERVERS = {"gunicorn": "newsroom.wsgi:application", "uvicorn": "newsroom.asgi:application"}
#: Seconds uvicorn keeps an idle connection open: longer than any phase of the run, as an app
#: server behind a proxy keeps it longer than the proxy does. Its default, 5 s, closed the
#: generator's idle pooled connections under it (gunicorn's sync workers close each one).
KEEP_ALIVE = 120
#: The no-op applications of :mod:`~benchmarks.site.floor`, per app server.
FLOOR_APPS = {"gunicorn": "floor:wsgi", "uvicorn": "floor:asgi"}


def server_command(server: str, app: str, workers: int, port: int, app_dir: Path | None = None) -> list[str]:
    """Return the command that serves *app* with *workers* of *server* on 127.0.0.1:*port*."""
    if server == "gunicorn":
        command = [sys.executable, "-m", "gunicorn", app, "--worker-class", "sync", "--workers", str(workers),
                   "--bind", f"127.0.0.1:{port}", "--backlog", "2048", "--timeout", "120", "--log-level", "warning"]  # fmt: skip
        return command + (["--chdir", str(app_dir)] if app_dir else [])
    if server == "uvicorn":
        command = [sys.executable, "-m", "uvicorn", app, "--workers", str(workers), "--host", "127.0.0.1",
                   "--port", str(port), "--backlog", "2048", "--timeout-keep-alive", str(KEEP_ALIVE),
                   "--log-level", "warning", "--no-access-log",
                   "--lifespan", "off"]  # fmt: skip
        return command + (["--app-dir", str(app_dir)] if app_dir else [])
    raise ValueError(f"unknown app server {server!r} (one of {', '.join(SERVERS)})")


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(
    config: str,
    metrics_dir: str,
    cache_url: str,
    broker_url: str,
    server: str = "gunicorn",
    cache_ttl: int | None = None,
) -> dict[str, str]:
    """Return the environment of the deployment's processes for *config* under *server*
    (*cache_ttl*: the seconds its cached pages are fresh for, when not the project's own)."""
    env = {key: value for key, value in os.environ.items() if key not in DROPPED}
    if cache_ttl is not None:
        env["DJANGO_SCALE_EXAMPLE_CACHE_TTL"] = str(cache_ttl)
    env.update(
        DJANGO_SETTINGS_MODULE="newsroom.settings",
        DJANGO_SCALE_EXAMPLE_CONFIG=config,
        DJANGO_SCALE_EXAMPLE_METRICS_DIR=metrics_dir,
        # The settings turn persistent connections off under an ASGI server (newsroom.settings).
        DJANGO_SCALE_EXAMPLE_SERVER=server,
        REDIS_URL=cache_url,
        CELERY_BROKER_URL=broker_url,
        # DEBUG keeps every query of a process in memory: never under load.
        DJANGO_DEBUG="0",
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLE_PROJECT), os.environ.get("PYTHONPATH", "")])),
    )
    return env


class RedisServer:
    """A ``redis-server`` of the deployment's, on a fixed local port: stopped, started, frozen."""

    def __init__(self, directory: Path, name: str) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("bench site needs redis-server on PATH (the test harness's Redis)")
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again, on the same port, empty) and wait until it answers PING."""
        assert self.binary is not None
        self.process = _start(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            dict(os.environ), self.directory / f"{self.name}.log",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server ({self.name}) exited at start")
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server ({self.name}) did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop the server (its data is gone: nothing is saved)."""
        if self.process is not None:
            self.thaw()
            _stop(self.process)
            self.process = None

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open, nothing answers (a hung host)."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)


@dataclass
class Deployment:
    """One configuration's running processes."""

    config: str
    host: str
    port: int
    #: The app server's master process (gunicorn's arbiter, uvicorn's supervisor).
    server: subprocess.Popen[bytes]
    celery: subprocess.Popen[bytes] | None
    metrics_dir: str
    log_dir: Path
    workers: int
    cache: RedisServer | None
    broker: RedisServer | None
    #: Which app server (a key of :data:`SERVERS`).
    kind: str = "gunicorn"

    def worker_pids(self) -> list[int]:
        """Return the pids of the app server's workers (the master's children)."""
        if self.kind == "uvicorn" and self.workers == 1:
            # One uvicorn worker is the process itself: no supervisor.
            return [self.server.pid]
        path = Path(f"/proc/{self.server.pid}/task/{self.server.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def cpu_seconds(self) -> float:
        """Return the CPU time (user + system) the app server's workers have used so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.worker_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def logs(self) -> str:
        """Return the tail of both processes' logs (for an error message)."""
        parts = []
        for name in ("server.log", "celery.log"):
            path = self.log_dir / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as output:
        return subprocess.Popen(
            command,
            cwd=EXAMPLE_PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop *process* and everything in its process group."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=GRACE)
    # Workers left behind by a master that died first are in the group still.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _wait_until_serving(deployment: Deployment, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if deployment.server.poll() is not None:
            raise RuntimeError(
                f"{deployment.kind} exited with status {deployment.server.returncode}\n{deployment.logs()}"
            )
        if deployment.celery is not None and deployment.celery.poll() is not None:
            raise RuntimeError(
                f"the Celery worker exited with status {deployment.celery.returncode}\n{deployment.logs()}"
            )
        try:
            with socket.create_connection((deployment.host, deployment.port), timeout=1):
                if len(deployment.worker_pids()) >= deployment.workers:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{deployment.kind} did not serve within {timeout:.0f} s\n{deployment.logs()}")


@contextmanager
def deployment(
    config: str, *, workers: int = WORKERS, server: str = "gunicorn", cache_ttl: int | None = None
) -> Iterator[Deployment]:
    """Run the example project in *config* under *server*, with a Celery worker, for the block
    (*cache_ttl*: as :func:`child_env`)."""
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-site-{config}-")))
        metrics_dir = str(log_dir / "metrics")
        cache, broker = RedisServer(log_dir, "cache"), RedisServer(log_dir, "broker")
        for redis in (cache, broker):
            stack.callback(redis.stop)
            redis.start()
        env = child_env(config, metrics_dir, cache.url, broker.url, server, cache_ttl)
        port = free_port()
        celery = _start(
            [sys.executable, "-m", "celery", "-A", "newsroom", "worker", "--pool", "solo",
             "--loglevel", "WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle"],
            env, log_dir / "celery.log",
        )  # fmt: skip
        stack.callback(_stop, celery)
        app_server = _start(
            server_command(server, SERVERS[server], workers, port), env, log_dir / "server.log"
        )
        stack.callback(_stop, app_server)
        running = Deployment(
            config,
            "127.0.0.1",
            port,
            app_server,
            celery,
            metrics_dir,
            log_dir,
            workers,
            cache,
            broker,
            server,
        )
        _wait_until_serving(running)
        yield running


@contextmanager
def floor(server: str, *, workers: int = WORKERS) -> Iterator[Deployment]:
    """Serve :mod:`~benchmarks.site.floor`'s no-op application under *server*, alone, for the block."""
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-site-floor-{server}-")))
        port = free_port()
        command = server_command(server, FLOOR_APPS[server], workers, port, Path(__file__).resolve().parent)
        env = {**os.environ, "BENCH_SITE_FLOOR_LOG": str(log_dir / "arrivals.log")}
        app_server = _start(command, env, log_dir / "server.log")
        stack.callback(_stop, app_server)
        running = Deployment(
            "floor", "127.0.0.1", port, app_server, None, "", log_dir, workers, None, None, server
        )
        _wait_until_serving(running)
        yield running
