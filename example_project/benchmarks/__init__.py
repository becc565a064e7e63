"""Benchmarks of django-scale against stock Django and the best existing package.

Each module has ``run(out, quick)`` and prints tables of ratios measured side by side in one
run. ``python example_project/manage.py bench <feature>`` runs one.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from django.db import connections

from django_scale.conf import conf
from django_scale.replicas import monitor, parse_lsn

__all__ = ["print_table", "require_replica", "rerun_under_callgrind", "time_per_call", "wait_for_replicas"]


def time_per_call(function: Callable[[], object], *, calls: int, repeats: int = 5) -> float:
    """Return the median time of one call of *function*, in seconds, over *repeats* runs."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


def rerun_under_callgrind(
    valgrind: str, directory: str, child_env: Mapping[str, str], argv: Sequence[str] | None = None
) -> None:
    """Run this command (or the script and arguments *argv*) again under callgrind, its dumps
    in *directory*, with *child_env* added.

    One dump per thread, and a new one at each ``os.getppid()`` call: the child marks the
    boundaries of what it measures with them. The child gets a fixed hash seed (dict layouts,
    and so the instructions, repeat from run to run) and uses this process's services (the
    settings left their URLs in the environment) rather than start its own.
    """
    command = [
        valgrind,
        "--tool=callgrind",
        "--separate-threads=yes",
        "--dump-before=getppid",
        f"--callgrind-out-file={directory}/cg.%p",
        sys.executable,
        *(sys.argv if argv is None else argv),
    ]
    env = {**os.environ, **child_env, "PYTHONHASHSEED": "0"}
    env.pop("DJANGO_SCALE_EXAMPLE_HARNESS", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode:
        raise SystemExit(f"the run under callgrind failed:\n{done.stderr[-3000:]}")


def print_table(out: TextIO, title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print *rows* under *header* as an aligned plain-text table."""
    cells = [[str(cell) for cell in header], *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out.write(f"\n{title}\n")
    for n, row in enumerate(cells):
        out.write(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            + "\n"
        )
        if n == 0:
            out.write("  ".join("-" * width for width in widths) + "\n")


def require_replica(out: TextIO, feature: str) -> str:
    """Return the first replica alias, or explain what *feature*'s benchmark needs and exit."""
    replicas = conf.REPLICAS
    if not replicas or connections[replicas[0]].vendor != "postgresql":
        out.write(
            f"bench {feature} needs PostgreSQL with a streaming replica. Set DATABASE_URL and "
            "REPLICA_URL, or run with DJANGO_SCALE_EXAMPLE_HARNESS=1 to start a throwaway primary "
            "and replica with the test harness.\n"
        )
        raise SystemExit(2)
    return replicas[0]


def wait_for_replicas(what: str, timeout: float) -> None:
    """Wait until every replica has replayed the primary's current WAL position, or exit.

    After a benchmark writes its rows: the replicas serve reads, and must have them (and the
    statistics of the ``ANALYZE`` before) first. *what* names the rows in the error message.
    """
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()::text")
        position = parse_lsn(cursor.fetchone()[0])
    for alias in conf.REPLICAS:
        if not monitor(alias).wait_for(position, timeout):
            raise SystemExit(f"replica {alias!r} did not replay {what} within {timeout:.0f} s")
