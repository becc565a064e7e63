"""A real Redis Sentinel set-up for the failover tests: a master, a replica and one sentinel.

Started on demand by tests/test_redis_sentinel.py (not by every test run: it needs Debian's
``redis-sentinel`` and only those tests use it), under a directory of its own, on free ports;
:meth:`SentinelSet.stop` kills the servers. One sentinel with a quorum of 1 is enough for
``SENTINEL FAILOVER``, which needs no agreement that the master is down.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import HarnessError, free_port

SERVICE = "mymaster"
INSTALL_HINT = "Install Redis Sentinel: `apt-get install redis-sentinel` (Debian/Ubuntu)."


def _command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one inline command to a Redis or sentinel on *port*; return the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        # Multi-line replies (arrays, bulk strings): read a little more until quiet.
        sock.settimeout(0.1)
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
        return reply


@dataclass
class SentinelSet:
    root: Path
    master_port: int
    replica_port: int
    sentinel_port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def master(self) -> int:
        """The port of the master as the sentinel names it now."""
        reply = _command(self.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(reply.split(b"\r\n")[-2])

    def failover(self, timeout: float = 30.0) -> int:
        """Run ``SENTINEL FAILOVER`` and wait until the other server is master; return its port."""
        before = self.master()
        reply = _command(self.sentinel_port, "SENTINEL", "FAILOVER", SERVICE)
        if not reply.startswith(b"+OK"):
            raise HarnessError(f"SENTINEL FAILOVER refused: {reply!r}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = self.master()
            if after != before and b"role:master" in _command(after, "INFO", "replication"):
                return after
            time.sleep(0.05)
        raise HarnessError(f"the failover did not complete within {timeout:g} s")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait(
    port: int, ready: bytes, what: str, command: tuple[str, ...] = ("PING",), timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready in _command(port, *command):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise HarnessError(f"{what} was not ready within {timeout:g} s")


def start(root: Path) -> SentinelSet:
    """Start a master, a replica of it and a sentinel monitoring them, under *root*."""
    server, sentinel = shutil.which("redis-server"), shutil.which("redis-sentinel")
    if server is None or sentinel is None:
        raise HarnessError(f"redis-server or redis-sentinel is not on PATH. {INSTALL_HINT}")
    root.mkdir(parents=True, exist_ok=True)
    found = SentinelSet(root, free_port(), free_port(), free_port())
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)]
    try:
        for name, port, extra in (
            ("master", found.master_port, []),
            ("replica", found.replica_port, ["--replicaof", "127.0.0.1", str(found.master_port)]),
        ):
            found.processes.append(
                subprocess.Popen(
                    [server, "--port", str(port), *common, "--logfile", str(root / f"{name}.log"), *extra],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        _wait(found.master_port, b"+PONG", "the Redis master")
        _wait(found.replica_port, b"master_link_status:up", "the Redis replica", ("INFO", "replication"))
        config = root / "sentinel.conf"
        config.write_text(
            f"port {found.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {root}\n"
            f"logfile {root / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {found.master_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        found.processes.append(
            subprocess.Popen(
                [sentinel, str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        # The sentinel must know the replica before it can fail over to it.
        _wait(
            found.sentinel_port,
            str(found.replica_port).encode(),
            "the sentinel discovering the replica",
            ("SENTINEL", "REPLICAS", SERVICE),
        )
    except BaseException:
        found.stop()
        raise
    return found
