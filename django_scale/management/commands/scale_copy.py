"""``manage.py scale_copy``: copy a table, a model or a queryset from one database to another with ``COPY``."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Model, QuerySet
from django.utils.module_loading import import_string

from django_scale.bulk.batches import iter_bounds
from django_scale.bulk.pipe import copy_between, plan_copy
from django_scale.bulk.progress import progress_bar
from django_scale.conf import count_problem
from django_scale.exceptions import DjangoScaleError


def _model(label: str) -> type[Model] | None:
    """The model named ``app_label.Model``, or whose table is *label*; ``None`` if none is."""
    if label.count(".") == 1:
        try:
            return apps.get_model(label)
        except (LookupError, ValueError):
            pass
    return next((model for model in apps.get_models() if model._meta.db_table == label), None)


class Command(BaseCommand):
    help = (
        "Copy rows between databases with COPY ... TO STDOUT | COPY ... FROM STDIN, binary, no Python "
        "object per row. SOURCE is app_label.Model, a table name, or the dotted path of a callable "
        "returning a queryset (e.g. a values() with renames and transforms)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "source", help="app_label.Model, a table name, or path.to.callable returning a queryset"
        )
        parser.add_argument(
            "--from", dest="source_alias", required=True, metavar="ALIAS", help="the source database"
        )
        parser.add_argument(
            "--to", dest="target_alias", default=DEFAULT_DB_ALIAS, metavar="ALIAS",
            help="the target database (default: default)",
        )  # fmt: skip
        parser.add_argument(
            "--into", metavar="app_label.Model", help="the target model (default: the source's)"
        )
        parser.add_argument(
            "--batch-size", type=int, default=None, help="rows per batch, each its own transaction"
        )
        parser.add_argument(
            "--resume", metavar="NAME",
            help="checkpoint each batch under NAME (needs django_scale.contrib.backfill); rerun to continue",
        )  # fmt: skip
        parser.add_argument("--upsert", metavar="FIELD[,FIELD]", help="update rows whose FIELDs exist")
        parser.add_argument("--dry-run", action="store_true", help="print the SQL, copy nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        source_alias: str = options["source_alias"]
        target_alias: str = options["target_alias"]
        for alias in (source_alias, target_alias):
            if alias not in connections:
                raise CommandError(f"No database alias {alias!r} in DATABASES.")
        queryset = self._queryset(options["source"]).using(source_alias)
        target = _model(options["into"]) if options["into"] else queryset.model
        if target is None:
            raise CommandError(f"No model is named {options['into']!r}.")
        batch_size = options["batch_size"]
        if options["resume"] and batch_size is None:
            batch_size = 10_000
        problem = None if batch_size is None else count_problem(batch_size)
        if problem is not None:
            raise CommandError(f"--batch-size {problem.removeprefix('it ')}, not {batch_size}.")
        try:
            if options["dry_run"]:
                self._dry_run(queryset, target, target_alias, batch_size)
                return
            copied = copy_between(
                queryset,
                target,
                using=target_alias,
                batch_size=batch_size or 100_000,
                resume=options["resume"],
                unique_fields=options["upsert"].split(",") if options["upsert"] else None,
                progress=progress_bar(self.stderr),
            )
        except DjangoScaleError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            f"copied {copied:,} rows from {source_alias} to {target._meta.label} ({target._meta.db_table}) on {target_alias}"
        )

    def _queryset(self, source: str) -> QuerySet[Any]:
        model = _model(source)
        if model is not None:
            return model._default_manager.all()
        try:
            factory = import_string(source)
        except ImportError as error:
            raise CommandError(
                f"{source!r} is not app_label.Model, a table of an installed model, or an importable callable: {error}"
            ) from error
        queryset = factory() if callable(factory) else factory
        if not isinstance(queryset, QuerySet):
            raise CommandError(f"{source!r} returned {type(queryset).__name__}, not a QuerySet.")
        return queryset

    def _dry_run(
        self, queryset: QuerySet[Any], target: type[Model], alias: str, batch_size: int | None
    ) -> None:
        plan = plan_copy(queryset, target, using=alias)
        both = connections[plan.source_alias].vendor == connections[alias].vendor == "postgresql"
        self.stdout.write(f"-- on {plan.source_alias}:")
        if both:
            self.stdout.write(plan.copy_out_sql() + ";")
            self.stdout.write(f"-- on {alias}:")
            self.stdout.write(plan.copy_in_sql() + ";")
        else:
            self.stdout.write(plan.select_sql() + ";")
            self.stdout.write(f"-- on {alias}: rows through copy_from() into {target._meta.db_table}")
        if batch_size:
            ranges = sum(1 for _ in iter_bounds(plan.source, batch_size))
            self.stdout.write(f"-- in {ranges} batches of up to {batch_size:,} rows, by key")
