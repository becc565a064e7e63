"""The demo's wins that need PostgreSQL with a streaming replica (``manage.py demo --services``).

On the embedded default (SQLite) each section says how to see it instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import connections
from django.db.models import F
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_scale.bulk import copy_from
from django_scale.conf import conf
from django_scale.middleware import current_wal_position
from django_scale.replicas import decode_position, routing_state
from django_scale.sniper import snipe
from django_scale.testing import capture_reads, simulate_lag

from news.models import Article, Comment
from news.wins import row

if TYPE_CHECKING:
    from news.management.commands.demo import Command

#: Page views of the article list whose reads are counted.
PAGE_VIEWS = 20
#: Rows loaded by bulk_create() and by copy_from().
LOAD_ROWS = 20_000


def _needs_services(command: Command, what: str) -> bool:
    """Say how to see *what* when the demo runs without PostgreSQL and a replica; return True then."""
    if connections[conf.PRIMARY].vendor == "postgresql" and conf.REPLICAS:
        return False
    row(command, what, "needs PostgreSQL with a replica: python example_project/manage.py demo --services")
    return True


def show_replica_reads(command: Command) -> None:
    """The share of the article list's reads the replica serves."""
    command.heading(f"Reads on the replica: the article list, {PAGE_VIEWS} page views")
    if _needs_services(command, "reads"):
        return
    # The test client's host must pass ALLOWED_HOSTS (with DEBUG on and none set, localhost does).
    host = next((h for h in settings.ALLOWED_HOSTS if h != "*" and not h.startswith(".")), "localhost")
    client = Client(HTTP_HOST=host)
    with contextlib.ExitStack() as stack:
        captures = {
            alias: stack.enter_context(CaptureQueriesContext(connections[alias]))
            for alias in settings.DATABASES
        }
        for _ in range(PAGE_VIEWS):
            client.get("/articles/")
    total = sum(len(capture.captured_queries) for capture in captures.values())
    for alias, capture in sorted(captures.items()):
        count = len(capture.captured_queries)
        role = "replica" if alias in conf.REPLICAS else "primary"
        row(command, f"{alias} ({role})", f"{count:>4} queries  {count / total:>5.0%}")


def show_read_your_writes(command: Command) -> None:
    """A user reads their own write from the primary while the replica has not replayed it."""
    command.heading("Read your writes: replay paused on the replica, one user writes")
    if _needs_services(command, "read your writes"):
        return
    replica = conf.REPLICAS[0]
    article = Article.objects.db_manager(conf.PRIMARY).published().first()
    if article is None:
        return
    with simulate_lag(replica):
        # The writer's request: one write, then the position it reached (ScaleMiddleware puts
        # it in the user's signed cookie).
        with routing_state():
            Article.objects.filter(pk=article.pk).update(views=F("views") + 1)
            position = current_wal_position(conf.PRIMARY)
        required, _ = decode_position(position)
        after = article.views + 1
        for who, lsn in (("the writer", required), ("another user", None)):
            with routing_state(lsn), capture_reads() as reads:
                views = Article.objects.get(pk=article.pk).views
            served = ", ".join(sorted(reads)) or "?"
            verdict = (
                "sees the write" if views == after else "sees the replica's older row (no write of theirs)"
            )
            row(command, who, f"read from {served}: views={views}, {verdict}")


def show_sniper(command: Command) -> None:
    """A runaway query cancelled by the query sniper."""
    command.heading("The query sniper: a runaway query, a rule of 1 s")
    if _needs_services(command, "sniper"):
        return
    db = conf.PRIMARY
    outcome: list[str] = []

    def runaway() -> None:
        try:
            with connections[db].cursor() as cursor:
                cursor.execute("SELECT pg_sleep(60)")
            outcome.append("finished")
        except Exception as error:
            outcome.append(type(error).__name__)
        finally:
            connections[db].close()

    started = time.perf_counter()
    thread = threading.Thread(target=runaway)
    thread.start()
    report = None
    while thread.is_alive() and time.perf_counter() - started < 30:
        time.sleep(0.5)
        report = snipe(using=[db], rules=[{"name": "demo: over 1 s", "max_duration": 1}], dry_run=False)
        if report.kills:
            break
    thread.join(timeout=30)
    killed = len(report.kills) if report else 0
    row(
        command,
        "runaway query",
        f"{outcome[0] if outcome else 'still running'} after {time.perf_counter() - started:.1f} s "
        f"({killed} cancelled by the sniper)",
    )


def show_copy(command: Command) -> None:
    """Loading rows: bulk_create() against copy_from()."""
    command.heading(f"Loading {LOAD_ROWS:,} comments: bulk_create() against COPY")
    if _needs_services(command, "COPY"):
        return
    db = conf.PRIMARY
    article_ids = list(Article.objects.db_manager(db).values_list("pk", flat=True)[:100])
    now = timezone.now() - timedelta(days=1)

    def rows() -> list[Comment]:
        return [
            Comment(
                article_id=article_ids[i % len(article_ids)],
                author_name="loader",
                body=f"comment {i}",
                created_at=now,
            )
            for i in range(LOAD_ROWS)
        ]

    ways: list[tuple[str, Callable[[list[Comment]], object]]] = [
        (
            "bulk_create()",
            lambda comments: Comment.objects.db_manager(db).bulk_create(comments, batch_size=1000),
        ),
        ("copy_from()", lambda comments: copy_from(Comment, comments, using=db)),
    ]
    for label, load in ways:
        comments = rows()  # built before the clock starts: only the loading is timed
        started = time.perf_counter()
        load(comments)
        seconds = time.perf_counter() - started
        row(command, label, f"{LOAD_ROWS / seconds:>9,.0f} rows/s")
    Comment.objects.db_manager(db).filter(author_name="loader").delete()


#: The sections, in the order the demo prints them.
SERVICE_WINS: tuple[Callable[[Command], None], ...] = (
    show_replica_reads,
    show_read_your_writes,
    show_sniper,
    show_copy,
)
