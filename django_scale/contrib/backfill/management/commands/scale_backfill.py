"""``manage.py scale_backfill``: run, inspect and reset resumable backfills."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.module_loading import import_string

from django_scale.conf import count_problem
from django_scale.contrib.backfill.models import BackfillCheckpoint
from django_scale.contrib.backfill.runner import Backfill, progress_bar, run_backfill
from django_scale.exceptions import DjangoScaleError


class Command(BaseCommand):
    help = "Run a resumable backfill (run PATH), show checkpoints (status [NAME]) or reset one (reset NAME)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default=None, help="the database holding the checkpoints")
        actions = parser.add_subparsers(dest="action", required=True, metavar="{run,status,reset}")
        run = actions.add_parser("run", help="run a backfill from its checkpoint to the end")
        run.add_argument(
            "path", help="dotted path of a django_scale.contrib.backfill.runner.Backfill subclass"
        )
        run.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the class's)")
        run.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
        status = actions.add_parser("status", help="show the checkpoints")
        status.add_argument("name", nargs="?", help="only this backfill")
        reset = actions.add_parser("reset", help="forget a backfill's checkpoint, so it runs from the start")
        reset.add_argument("name")

    def handle(self, *args: Any, action: str, database: str | None, **options: Any) -> None:
        if action == "run":
            self._run(options["path"], options["batch_size"], options["max_batches"])
        elif action == "status":
            self._status(database, options["name"])
        else:
            deleted, _ = BackfillCheckpoint.objects.using(database).filter(name=options["name"]).delete()
            if not deleted:
                raise CommandError(f"No backfill checkpoint is named {options['name']!r}.")
            self.stdout.write(f"reset {options['name']}")

    def _run(self, path: str, batch_size: int | None, max_batches: int | None) -> None:
        problem = None if batch_size is None else count_problem(batch_size)
        if problem is not None:
            raise CommandError(f"--batch-size {problem.removeprefix('it ')}, not {batch_size}.")
        try:
            cls = import_string(path)
        except ImportError as error:
            raise CommandError(f"Cannot import {path!r}: {error}") from error
        if not (isinstance(cls, type) and issubclass(cls, Backfill)):
            raise CommandError(
                f"{path!r} is not a subclass of django_scale.contrib.backfill.runner.Backfill."
            )
        try:
            checkpoint = run_backfill(
                cls(), progress=progress_bar(self.stderr), batch_size=batch_size, max_batches=max_batches
            )
        except DjangoScaleError as error:
            raise CommandError(str(error)) from error
        state = "finished" if checkpoint.finished_at else "paused"
        self.stdout.write(
            f"\n{checkpoint.name}: {state}, {checkpoint.rows_done:,} rows in {checkpoint.batches_done:,} batches"
        )

    def _status(self, database: str | None, name: str | None) -> None:
        checkpoints = BackfillCheckpoint.objects.using(database).order_by("name")
        if name:
            checkpoints = checkpoints.filter(name=name)
        rows = list(checkpoints)
        if not rows:
            self.stdout.write("no backfills" if not name else f"no backfill named {name!r}")
            return
        for checkpoint in rows:
            total = checkpoint.rows_total
            share = f" ({checkpoint.rows_done / total:.0%} of ~{total:,})" if total else ""
            state = (
                f"finished {checkpoint.finished_at:%Y-%m-%d %H:%M:%S}"
                if checkpoint.finished_at
                else "unfinished"
            )
            self.stdout.write(
                f"{checkpoint.name}: {state}, {checkpoint.rows_done:,} rows{share}, "
                f"last key {checkpoint.last_key!r}, updated {checkpoint.updated_at:%Y-%m-%d %H:%M:%S}"
            )
