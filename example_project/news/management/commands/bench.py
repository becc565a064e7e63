"""``manage.py bench <feature>``: benchmark a django-scale feature against the alternatives."""

from __future__ import annotations

import importlib
import inspect
import platform
import sys
from typing import Any

import django
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from django_scale.conf import conf

#: Each feature's benchmark module; its ``run(out, quick)`` prints the tables.
FEATURES = {
    "admin": "benchmarks.admin",
    "bulk": "benchmarks.bulk",
    "cache": "benchmarks.cache",
    "indexes": "benchmarks.indexes",
    "metrics": "benchmarks.metrics",
    "migrate": "benchmarks.migrate",
    "prefetch": "benchmarks.prefetch",
    "querycache": "benchmarks.querycache",
    "request": "benchmarks.request",
    "routing": "benchmarks.routing",
    "site": "benchmarks.site.run",
    "timeouts": "benchmarks.timeouts",
}


class Command(BaseCommand):
    help = "Benchmark a django-scale feature against stock Django and the best existing package."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("feature", choices=sorted(FEATURES), help="the feature to benchmark")
        parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")
        parser.add_argument(
            "--rows",
            type=lambda value: [int(n.replace("_", "")) for n in value.split(",")],
            help="table sizes, comma-separated (admin: e.g. 100000,1000000,10000000; bulk, indexes: one size, e.g. 1000000)",
        )

        parser.add_argument(
            "--articles",
            type=lambda value: int(value.replace("_", "")),
            help="site: articles to seed (default 1,000,000; 100,000 with --quick)",
        )
        parser.add_argument(
            "--json", dest="json_path", metavar="PATH", help="site: also write every figure to PATH"
        )

    def handle(
        self,
        *args: Any,
        feature: str,
        quick: bool,
        rows: list[int] | None,
        articles: int | None,
        json_path: str | None,
        **options: Any,
    ) -> None:
        if rows is not None and min(rows) < 1:
            raise CommandError("--rows must be at least 1.")
        if articles is not None and articles < 10:
            raise CommandError("--articles must be at least 10.")
        if (articles is not None or json_path) and feature != "site":
            raise CommandError("--articles and --json are options of bench site only.")
        call_command("migrate", verbosity=0, interactive=False)
        primary = connections[conf.PRIMARY]
        with primary.cursor():
            pg_version = getattr(primary, "pg_version", 0)
        server = ".".join(str(part) for part in divmod(pg_version, 10000)) if pg_version else primary.vendor
        self.stdout.write(
            f"bench {feature}: Django {django.get_version()}, Python {platform.python_version()}, "
            f"{primary.vendor} {server}, replicas: {', '.join(conf.REPLICAS) or 'none'}"
        )
        module = importlib.import_module(FEATURES[feature])
        run = module.run
        parameters = inspect.signature(run).parameters
        if feature == "site":
            run(self.stdout, quick=quick, articles=articles, json_path=json_path)
        elif rows and "sizes" in parameters:
            run(self.stdout, quick=quick, sizes=rows)
        elif rows and "rows" in parameters and len(rows) == 1:
            run(self.stdout, quick=quick, rows=rows[0])
        elif rows:
            raise CommandError(f"bench {feature} takes no --rows option, or only one size")
        else:
            run(self.stdout, quick=quick)
        sys.stdout.flush()
