"""``manage.py scale_indexes``: propose proven indexes, find unused and duplicate ones."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from django_scale.conf import conf
from django_scale.exceptions import ArgumentError
from django_scale.indexes.advisor import Advice, advise
from django_scale.indexes.migration import index_for, save_baseline, verify, write_migration
from django_scale.indexes.stats import duplicate_indexes, unused_indexes


def _size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size //= 1024
    return f"{size} TB"


class Command(BaseCommand):
    help = (
        "Propose indexes for the heaviest statements (pg_stat_statements and the slow-query log), "
        "each proven with HypoPG to cut the estimated cost by half; list unused indexes (scans "
        "summed over the primary and every replica) and duplicate ones."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default=None, help="the alias to advise (default: PRIMARY)")
        parser.add_argument("--limit", type=int, default=20, help="how many statements to plan (default 20)")
        parser.add_argument(
            "--migration",
            metavar="APP",
            help="write a migration of APP adding its suggested indexes concurrently",
        )
        parser.add_argument(
            "--verify",
            action="store_true",
            help="compare the mean time of the statements proposed last time, before and since",
        )
        parser.add_argument(
            "--null-planning",
            action="store_true",
            help="plan with NULL parameters, as dexter does (for comparison)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["database"] or conf.PRIMARY
        if alias not in connections:
            raise CommandError(f"--database {alias!r} is not in DATABASES.")
        if connections[alias].vendor != "postgresql":
            raise CommandError(f"scale_indexes needs PostgreSQL; {alias!r} is {connections[alias].vendor}.")
        if options["verify"]:
            self._verify(alias)
            return
        from django_scale.slowlog import slow_queries

        aliases = (
            [alias, *(a for a in conf.REPLICAS if a in connections)] if alias == conf.PRIMARY else [alias]
        )
        advice = advise(
            alias,
            limit=options["limit"],
            slow=slow_queries(),
            planning="null" if options["null_planning"] else "best",
            # The replicas run most reads: their statements are advised too (planned here).
            statements_from=aliases[1:],
        )
        self._print_advice(advice)
        unused = unused_indexes(aliases)
        self.stdout.write(f"\nUnused indexes (scans summed over {', '.join(aliases)}):")
        for index in unused:
            self.stdout.write(f"  {index.table}.{index.name} ({_size(index.size_bytes)}): {index.definition}")
        if not unused:
            self.stdout.write("  none")
        self.stdout.write("\nDuplicate indexes:")
        duplicates = duplicate_indexes(alias)
        for duplicate in duplicates:
            self.stdout.write(
                f"  {duplicate.table}.{duplicate.name} ({_size(duplicate.size_bytes)}) is served by {duplicate.covered_by}"
            )
        if not duplicates:
            self.stdout.write("  none")
        if advice.suggestions and advice.proven:
            save_baseline(alias, advice.suggestions)
        if options["migration"]:
            try:
                path = write_migration(options["migration"], advice.suggestions if advice.proven else [])
            except ArgumentError as error:
                raise CommandError(str(error)) from error
            if path is None:
                self.stdout.write(
                    f"\nNo proven index is of a model of {options['migration']!r}: no migration written."
                )
            else:
                self.stdout.write(f"\nWrote {path}. Add the indexes to the models' Meta.indexes as well.")

    def _print_advice(self, advice: Advice) -> None:
        for note in advice.notes:
            self.stderr.write(f"note: {note}")
        title = "Proposed indexes" if advice.proven else "Candidate indexes (unproven: no HypoPG)"
        self.stdout.write(f"{title}:")
        if not advice.suggestions:
            self.stdout.write("  none")
        for suggestion in advice.suggestions:
            candidate = suggestion.candidate
            self.stdout.write(f"  {candidate.definition}")
            found = index_for(candidate)
            if found:
                model, index = found
                fields, name = index.fields, index.name
                self.stdout.write(
                    f"    {model._meta.label}.Meta.indexes: models.Index(fields={fields!r}, name={name!r})"
                )
            if advice.proven:
                self.stdout.write(
                    f"    estimated size {_size(suggestion.size_bytes)}; {suggestion.writes} rows written to "
                    f"{candidate.table} since the statistics were reset would each update it too "
                    f"(besides {suggestion.existing_indexes} indexes; {suggestion.live_rows} live rows)"
                )
            for planned in suggestion.statements:
                figures = f"cost {planned.cost_before:.0f} -> {planned.cost_after:.0f} (-{planned.cut:.0%})"
                self.stdout.write(
                    f"    serves [{planned.planning}] {figures}, {planned.mean_ms:.1f} ms mean: {planned.sql[:120]}"
                )
        if advice.rejected:
            self.stdout.write("Rejected (no candidate cuts the estimated cost by half):")
            for planned, best in advice.rejected:
                tried = best.definition if best else "no candidate"
                self.stdout.write(f"  {planned.sql[:100]}: best {tried}, -{planned.cut:.0%}")

    def _verify(self, alias: str) -> None:
        report = verify(alias)
        if not report:
            self.stdout.write(
                "Nothing to verify: run scale_indexes first (it remembers the statements' times)."
            )
            return
        self.stdout.write("queryid: mean before -> mean since (calls since)")
        for queryid, before, since, calls in report:
            after = f"{since:.2f} ms" if since is not None else "not run since"
            self.stdout.write(f"  {queryid}: {before:.2f} ms -> {after} ({calls})")
