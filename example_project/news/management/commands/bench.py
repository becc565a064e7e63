"""``manage.py bench <feature>``: benchmark a django-scale feature against the alternatives."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any

import django
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import connections

from django_scale.conf import conf

#: Each feature's benchmark module; its ``run(out, quick)`` prints the tables.
FEATURES = {"admin": "benchmarks.admin", "cache": "benchmarks.cache", "routing": "benchmarks.routing"}


class Command(BaseCommand):
    help = "Benchmark a django-scale feature against stock Django and the best existing package."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("feature", choices=sorted(FEATURES), help="the feature to benchmark")
        parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")

    def handle(self, *args: Any, feature: str, quick: bool, **options: Any) -> None:
        call_command("migrate", verbosity=0, interactive=False)
        primary = connections[conf.PRIMARY]
        with primary.cursor():
            pg_version = getattr(primary, "pg_version", None)
            server = (
                ".".join(str(part) for part in divmod(pg_version, 10000)) if pg_version else primary.vendor
            )
        self.stdout.write(
            f"bench {feature}: Django {django.get_version()}, Python {platform.python_version()}, "
            f"{primary.vendor} {server}, replicas: {', '.join(conf.REPLICAS) or 'none'}"
        )
        module = importlib.import_module(FEATURES[feature])
        module.run(self.stdout, quick=quick)
        sys.stdout.flush()
