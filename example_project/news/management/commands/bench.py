"""``manage.py bench <feature>``: benchmark a django-scale feature against the alternatives."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any

import django
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from django_scale.conf import conf

#: Each feature's benchmark module; its ``run(out, quick)`` prints the tables.
FEATURES = {"admin": "benchmarks.admin", "bulk": "benchmarks.bulk", "routing": "benchmarks.routing"}


class Command(BaseCommand):
    help = "Benchmark a django-scale feature against stock Django and the best existing package."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("feature", choices=sorted(FEATURES), help="the feature to benchmark")
        parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")
        parser.add_argument(
            "--rows",
            type=int,
            default=None,
            help="rows per method (bench bulk; default 100,000, --quick 10,000)",
        )

    def handle(self, *args: Any, feature: str, quick: bool, rows: int | None, **options: Any) -> None:
        if rows is not None and (rows < 1 or feature != "bulk"):
            raise CommandError("--rows is for bench bulk, and must be at least 1.")
        call_command("migrate", verbosity=0, interactive=False)
        primary = connections[conf.PRIMARY]
        with primary.cursor():
            version = getattr(primary, "pg_version", 0)
            server = ".".join(str(part) for part in divmod(version, 10000)) if version else primary.vendor
        self.stdout.write(
            f"bench {feature}: Django {django.get_version()}, Python {platform.python_version()}, "
            f"{primary.vendor} {server}, replicas: {', '.join(conf.REPLICAS) or 'none'}"
        )
        module = importlib.import_module(FEATURES[feature])
        module.run(self.stdout, quick=quick, **({"rows": rows} if rows else {}))
        sys.stdout.flush()
