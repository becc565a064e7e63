"""``bench timeouts``: what ``statement_timeout()`` costs per block, in both of its forms.

Three setups, side by side in one run, on the primary alias outside a transaction:

* stock Django: the same statements with no limit;
* the session form (the default): one ``set_config()`` before the block's first statement and
  one on exit, whatever the number of statements;
* the transaction-pooled form (``DJANGO_SCALE["POOLER"]`` says ``"transaction"``): each
  statement runs between ``BEGIN; SET LOCAL ...`` and ``COMMIT``, two round trips per
  statement, the only form that is correct behind PgBouncer in transaction mode.

Each block runs 1 or 10 ``SELECT 1``; the setups take turns in round-robin batches, so that a
noisy neighbour slows them all alike. Run it on direct connections, and with
``DJANGO_SCALE_TEST_POOLER=pgbouncer`` (and ``DJANGO_SCALE_EXAMPLE_HARNESS=1``) through a real
PgBouncer. No existing package limits statements through a transaction pooler; the baseline is
stock Django without a limit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TextIO

from django.db import connections

from django_scale.conf import conf
from django_scale.testing import override_scale_settings
from django_scale.timeouts import statement_timeout

from benchmarks import print_table

SETUPS = ("stock Django (no limit)", "session form", "POOLER transaction form")


def _block(alias: str, statements: int, limited: bool) -> None:
    connection = connections[alias]
    if limited:
        with statement_timeout(5, using=alias), connection.cursor() as cursor:
            for _ in range(statements):
                cursor.execute("SELECT 1")
                cursor.fetchone()
        return
    with connection.cursor() as cursor:
        for _ in range(statements):
            cursor.execute("SELECT 1")
            cursor.fetchone()


def run(out: TextIO, quick: bool = False) -> None:
    alias = conf.PRIMARY
    if connections[alias].vendor != "postgresql":
        out.write("bench timeouts needs PostgreSQL: set DATABASE_URL or DJANGO_SCALE_EXAMPLE_HARNESS=1.\n")
        raise SystemExit(2)
    rounds, per_batch = (5, 20) if quick else (30, 50)
    through = "PgBouncer" if conf.POOLER.get(alias) == "transaction" else "the configured connection"
    out.write(f"  alias {alias!r} through {through}\n")
    rows = []
    for statements in (1, 10):
        runs: dict[str, tuple[Callable[[], None], dict[str, str]]] = {
            SETUPS[0]: (lambda n=statements: _block(alias, n, False), {}),
            SETUPS[1]: (lambda n=statements: _block(alias, n, True), {}),
            SETUPS[2]: (lambda n=statements: _block(alias, n, True), {alias: "transaction"}),
        }
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (block, pooler) in runs.items():
                with override_scale_settings(POOLER=pooler):
                    started = time.perf_counter()
                    for _ in range(per_batch):
                        block()
                    samples[name].append((time.perf_counter() - started) / per_batch)
        stock = statistics.median(samples[SETUPS[0]])
        for name in runs:
            median = statistics.median(samples[name])
            rows.append(
                (
                    f"{statements} statement{'s' if statements > 1 else ''} per block",
                    name,
                    f"{median * 1e6:.0f}",
                    f"{median / stock:.2f}x",
                    f"+{(median - stock) * 1e6:.0f}",
                )
            )
    print_table(
        out,
        f"statement_timeout() per block (median of {rounds} batches of {per_batch})",
        ("block", "setup", "µs per block", "vs stock", "extra µs"),
        rows,
    )
