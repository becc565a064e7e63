"""``manage.py scale_snipe``: run the query sniper once, or every ``--loop`` seconds."""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from django_scale.conf import seconds_problem
from django_scale.exceptions import SniperError
from django_scale.metrics import enable
from django_scale.sniper import SnipeReport, snipe


class Command(BaseCommand):
    help = (
        "Cancel, then terminate, database queries that break DJANGO_SCALE['SNIPER_RULES']. "
        "Runs once, or every --loop seconds until interrupted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--loop",
            type=float,
            metavar="SECONDS",
            help="snipe every SECONDS seconds until interrupted (default: once)",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="report what would be killed, signal nothing (overrides SNIPER_DRY_RUN)",
        )
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="watch this alias (repeatable; default: SNIPER_DATABASES, else PRIMARY and REPLICAS)",
        )

    def handle(
        self, *args: Any, loop: float | None, dry_run: bool, databases: list[str] | None, **options: Any
    ) -> None:
        if loop is not None and seconds_problem(loop) is not None:
            raise CommandError(f"--loop must be a number of seconds greater than zero, not {loop}.")
        if "django_scale.metrics.MetricsMiddleware" in getattr(settings, "MIDDLEWARE", ()):
            # Kills go into the host's shared counters, where scale_status and /scale/ read them.
            enable()
        stop = threading.Event()
        try:
            while True:
                try:
                    report = snipe(using=databases, dry_run=True if dry_run else None)
                except SniperError as error:
                    raise CommandError(str(error)) from error
                self._print(report)
                if loop is None:
                    return
                # A connection the server dropped is replaced on the next run.
                for connection in connections.all(initialized_only=True):
                    connection.close_if_unusable_or_obsolete()
                stop.wait(loop)
        except KeyboardInterrupt:
            self.stdout.write("stopped")

    def _print(self, report: SnipeReport) -> None:
        if report.lock_busy:
            self.stdout.write("another sniper holds the lock: nothing done")
            return
        for kill in report.kills:
            self.stdout.write(kill.describe())
        for kill in report.missed:
            self.stdout.write(f"left alone (its query ended first): pid {kill.backend.pid} on {kill.alias!r}")
        if report.over_budget:
            self.stdout.write(f"kill budget spent: {len(report.over_budget)} more left alone")
        if not (report.kills or report.missed or report.over_budget):
            self.stdout.write("nothing to snipe")
