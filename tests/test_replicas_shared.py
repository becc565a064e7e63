"""Replica health shared by the processes of a host: one prober per replica, the rest read.

Real processes against the real standby: the number of probes and probe connections per
replica must not grow with the number of worker processes, a worker reads the shared record
without I/O, and when the prober dies another process takes over.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections
from support import SilentServer, subprocess_env, wait_until

from django_scale.replicas.hostshare import HostRecord, HostShare, host_share, share_key
from django_scale.testing import override_scale_settings

TESTS = Path(__file__).resolve().parent
REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


def _record(**changes: object) -> HostRecord:
    values: dict[str, object] = {
        "pid": 42, "published": time.time(), "checked": time.time(), "replay_lsn": 123456,
        "lag": 0.25, "down_until": 0.0, "failures": 1, "error": "",
    }  # fmt: skip
    values.update(changes)
    return HostRecord(**values)  # type: ignore[arg-type]


def test_one_process_leads_and_the_others_read_its_record(tmp_path):
    # flock() locks belong to an open file description: two HostShares in one process
    # contend like two processes.
    first, second = HostShare(tmp_path, "replica-x"), HostShare(tmp_path, "replica-x")
    try:
        assert first.try_lead() and first.leading
        assert not second.try_lead() and not second.leading
        assert second.read() is None  # nothing published yet
        record = _record(lag=None, error="connection refused")
        first.publish(record)
        assert second.read() == record
        first.close()
        # The lead is free again (as when the prober's process exits or is killed).
        assert second.try_lead()
        first.publish(_record(replay_lsn=1))  # closed: writes nothing
        assert second.read() == record
    finally:
        first.close()
        second.close()


def test_a_record_being_written_is_never_read_half(tmp_path):
    share = HostShare(tmp_path, "replica-y")
    try:
        share.publish(_record())
        assert share.read() is None  # only the prober writes
        assert share.try_lead()
        share.publish(_record())
        # An odd sequence number: a write under way (or a writer that died mid-write).
        (seq,) = struct.unpack_from("<Q", share._map, 0)
        struct.pack_into("<Q", share._map, 0, seq + 1)
        assert share.read() is None
        share.publish(_record(replay_lsn=7))
        found = share.read()
        assert found is not None and found.replay_lsn == 7
    finally:
        share.close()


def test_a_forked_child_lets_go_of_the_lead_it_inherited(tmp_path):
    # A gunicorn master that led before forking its workers must not keep the lock held
    # through them after it gives the lead up (or exits).
    settings_dict = {"ENGINE": "django.db.backends.postgresql", "HOST": "h", "PORT": "1", "NAME": "n"}
    with override_scale_settings(SHARED_HEALTH_DIR=str(tmp_path)):
        share = host_share("replica", settings_dict)
    assert share is not None and share.try_lead()
    ready, told = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads (the suite's monitors) may
        # deadlock; the child only says it runs, sleeps and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        # The at-fork hooks have run by the time fork() returns here.
        os.write(told, b"x")
        time.sleep(5)
        os._exit(0)
    os.close(told)
    try:
        assert os.read(ready, 1) == b"x"
        share.close()  # the parent gives the lead up while the child lives
        other = HostShare(tmp_path, share_key("replica", settings_dict))
        try:
            assert other.try_lead(), "the forked child still holds the lock it inherited"
        finally:
            other.close()
    finally:
        os.close(ready)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_files_are_named_after_what_the_replica_connects_to():
    one = {"ENGINE": "django.db.backends.postgresql", "HOST": "a", "PORT": "5432", "NAME": "db"}
    assert share_key("replica", one) == share_key("replica", dict(one))
    assert share_key("replica", one) != share_key("replica", {**one, "PORT": "5433"})
    assert share_key("replica", one) != share_key("replica2", one)


_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap_workers() -> Iterator[None]:
    """Kill the workers a failed test left waiting, and close their pipes.

    Left to the garbage collector, a later test would close their stdin (and so end them
    mid-run) whenever it happens to collect them, under its own name.
    """
    yield
    while _started:
        worker = _started.pop()
        if worker.poll() is None:
            worker.kill()
        worker.wait(60)
        for pipe in (worker.stdin, worker.stdout, worker.stderr):
            if pipe is not None:
                pipe.close()


def _workers(count: int, seconds: float, directory: Path, *extra: str) -> list[subprocess.Popen[str]]:
    """Start *count* worker processes; return once each has its monitor running."""
    script = str(TESTS / "shared_health_worker.py")
    workers = [
        subprocess.Popen(
            [sys.executable, "-W", "error", script, str(seconds), str(directory), *extra],
            env=subprocess_env(),
            cwd=TESTS,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    _started.extend(workers)
    for worker in workers:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if line.strip() != "ready":
            worker.kill()
            raise AssertionError(f"a worker did not start: {line!r} {worker.communicate()[1]}")
    return workers


def _tell(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()


def _results(workers: list[subprocess.Popen[str]]) -> list[dict[str, object]]:
    """Start the workers' window together; return what each measured once all are done."""
    _tell(workers)
    results = []
    for worker in workers:
        assert worker.stdout is not None
        results.append(json.loads(worker.stdout.readline()))
    _tell(workers)
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    return results


@REPLICA
def test_probes_per_replica_do_not_grow_with_workers(replica, tmp_path):
    results = _results(_workers(4, 3.0, tmp_path))
    probers = [result for result in results if int(result["probes"]) > 3]  # type: ignore[call-overload]
    # One process probes; the others copy its record. (A worker may probe once or twice at
    # start, before the first record is published.)
    assert len(probers) == 1, results
    followers = [result for result in results if result is not probers[0]]
    assert all(int(r["probes"]) <= 2 and int(r["shared_reads"]) > 10 for r in followers), results  # type: ignore[call-overload]
    # One probe connection per replica on the host, whatever the number of workers.
    assert [bool(r["connected"]) for r in results].count(True) == 1, results
    # Every worker's routing saw the replica available (from the shared record).
    assert all(int(r["available"]) > int(r["asked"]) * 0.7 for r in results), results  # type: ignore[call-overload]


@REPLICA
def test_shared_probes_and_routing_never_wait_on_a_hung_redis(replica, tmp_path):
    # CACHE_ALIAS, where the monitors also share ejections across hosts, accepts connections
    # and never answers. The host's processes still share one prober, and their routing still
    # sees the replica available.
    server = SilentServer()
    try:
        results = _results(_workers(3, 3.0, tmp_path, str(server.port)))
        assert server.accepted, "the workers never tried the hung cache"
    finally:
        server.close()
    assert [int(r["probes"]) > 3 for r in results].count(True) == 1, results  # type: ignore[call-overload]
    assert [bool(r["connected"]) for r in results].count(True) == 1, results
    assert all(int(r["available"]) > int(r["asked"]) * 0.7 for r in results), results  # type: ignore[call-overload]


@REPLICA
def test_another_process_takes_over_when_the_prober_dies(replica, tmp_path):
    workers = _workers(3, 6.0, tmp_path)
    _tell(workers)
    settings_dict = connections["replica"].settings_dict
    share = HostShare(tmp_path, share_key("replica", settings_dict))
    try:
        first = wait_until(share.read, "the first shared record")
        assert first.pid in {worker.pid for worker in workers}
        os.kill(first.pid, signal.SIGKILL)
        fresh = wait_until(
            lambda: (
                (r := share.read()) is not None
                and r.pid != first.pid
                and time.time() - r.published < 0.5
                and r
            ),
            "another process publishing",
            timeout=10,
        )
        assert fresh.pid in {worker.pid for worker in workers} and fresh.checked > 0
    finally:
        share.close()
    survivors = [worker for worker in workers if worker.pid != first.pid]
    results = []
    for worker in survivors:
        assert worker.stdout is not None
        results.append(json.loads(worker.stdout.readline()))
    _tell(survivors)
    for worker in workers:
        worker.communicate(timeout=60)
    # The survivors' routing kept seeing the replica available through the takeover.
    assert all(int(r["available"]) > int(r["asked"]) * 0.5 for r in results), results  # type: ignore[call-overload]
