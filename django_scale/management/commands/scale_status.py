"""``manage.py scale_status [--json]``: routes with percentiles, replicas, cache, sniper kills."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_scale.conf import conf
from django_scale.metrics import merge
from django_scale.metrics.status import status_document
from django_scale.metrics.store import WINDOWS


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


class Command(BaseCommand):
    help = (
        "Print each route's latency percentiles over 1, 5 and 15 minutes (every worker of this "
        "host merged), the replicas' lag and health, cache figures and sniper kills."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
        parser.add_argument(
            "--window", type=int, default=5, choices=WINDOWS, help="minutes the routes are sorted by"
        )
        parser.add_argument(
            "--limit", type=int, default=20, help="print this many slowest routes (tables only)"
        )
        parser.add_argument(
            "--cluster",
            action="store_true",
            help="merge every host published to the cache, not this host only",
        )
        parser.add_argument(
            "--pull",
            action="append",
            default=[],
            metavar="URL",
            help="merge the sketches.json of this host URL too, with METRICS_TOKEN (repeatable)",
        )
        parser.add_argument("--no-replicas", action="store_true", help="do not probe the replicas")
        parser.add_argument(
            "--publish",
            action="store_true",
            help="publish this host's sketches to the cache first (for --cluster)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["publish"]:
            merge.publish(merge.to_document(merge.local_snapshot()))
        snapshots = [merge.cluster() if options["cluster"] else merge.local_snapshot()]
        if options["pull"]:
            if not conf.METRICS_TOKEN:
                raise CommandError("--pull needs DJANGO_SCALE['METRICS_TOKEN'] to authenticate to each host.")
            for url in options["pull"]:
                try:
                    snapshots.append(merge.from_document(merge.pull(url, conf.METRICS_TOKEN)))
                except (OSError, ValueError) as error:
                    raise CommandError(f"Could not read {url}: {error}") from error
        snapshot = merge.merge_snapshots(snapshots)
        document = status_document(snapshot, options["window"], replicas=not options["no_replicas"])
        if options["json"]:
            self.stdout.write(json.dumps(document, indent=2, sort_keys=True))
            return
        window = str(options["window"])
        self.stdout.write(f"Routes, slowest p99 over {window} min first (milliseconds):")
        self.stdout.write(
            f"  {'route':<40} {'method':<7} {'requests':>9} {'p50':>8} {'p95':>8} {'p99':>8} {'p99.9':>8} "
            f"{'db ms':>7} {'queries':>7} {'fallbacks':>9}"
        )
        for row in document["routes"][: options["limit"]]:
            figures = row["windows"][window]
            db = sum(row["db_seconds"].values()) if row["db_seconds"] else None
            queries = sum(row["queries"].values())
            self.stdout.write(
                f"  {row['route'][:40]:<40} {row['method']:<7} {figures['requests']:>9} "
                f"{_ms(figures.get('p50')):>8} {_ms(figures.get('p95')):>8} {_ms(figures.get('p99')):>8} "
                f"{_ms(figures.get('p999')):>8} {_ms(db):>7} {queries:>7.1f} {row['fallbacks']:>9}"
            )
        if not document["routes"]:
            self.stdout.write(
                "  (no requests recorded: is django_scale.metrics.MetricsMiddleware in MIDDLEWARE?)"
            )
        self.stdout.write("Databases:")
        for row in document["replicas"]:
            share = "-" if row["read_share"] is None else f"{row['read_share']:.0%}"
            health = ""
            if row["role"] == "primary" and row["fallbacks"]:
                health = f", {row['fallbacks']} of them fallbacks (no replica could serve them)"
            if row["role"] == "replica":
                lag = "?" if row["lag"] is None else f"{row['lag']:.2f}s"
                health = f" {'available' if row['available'] else 'out'}, lag {lag}"
                if row["error"]:
                    health += f", error: {row['error']}"
            self.stdout.write(f"  {row['alias']} ({row['role']}): {row['reads']} reads ({share}){health}")
        cache = document["cache"]
        rate = "-" if cache["hit_rate"] is None else f"{cache['hit_rate']:.1%}"
        self.stdout.write(f"Cache: hit rate {rate}")
        for name, value in cache["events"].items():
            self.stdout.write(f"  {name}: {value}")
        self.stdout.write("Sniper:")
        for name, value in document["sniper"].items():
            self.stdout.write(f"  {name}: {value}")
        if not document["sniper"]:
            self.stdout.write("  no kills recorded")
        if document["kills"]:
            self.stdout.write("Recent kills, newest first:")
        for kill in document["kills"][: options["limit"]]:
            when = datetime.fromtimestamp(float(kill.get("at") or 0.0), tz=timezone.utc)
            action = f"would {kill.get('action')}" if kill.get("dry_run") else kill.get("action")
            self.stdout.write(
                f"  {when:%Y-%m-%d %H:%M:%S} UTC {action} pid {kill.get('pid')} on {kill.get('alias')} "
                f"({kill.get('host')}), {float(kill.get('duration') or 0.0):.1f} s {kill.get('state')}, "
                f"rule {kill.get('rule')!r}: [{kill.get('fingerprint_id')}] {str(kill.get('fingerprint'))[:120]}"
            )
        slots = document["slots"]
        self.stdout.write(
            f"Worker slots: {slots['live']} live, {slots['used']} used, {slots['dropped']} values dropped"
        )
