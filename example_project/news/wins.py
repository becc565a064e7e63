"""What django-scale changes, measured side by side on the demo's data: ``manage.py demo``'s wins.

Each section runs the same work the stock Django way and the django-scale way, in this
process, on the database the demo uses (SQLite by default), and prints queries and time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import django
from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import connections
from django.db.models import Count
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext

from django_scale.cache import stale_while_revalidate
from django_scale.conf import conf
from django_scale.exceptions import NPlusOneError
from django_scale.prefetch import detect_n_plus_one
from django_scale.timeouts import is_statement_timeout, statement_timeout

from news.models import Article

if TYPE_CHECKING:
    from news.management.commands.demo import Command

#: The rows of the list page the first section renders.
PAGE = 100
#: The width of the first column of each section's table.
LABEL = 26


def row(command: Command, label: str, value: str) -> None:
    command.stdout.write(f"  {label:<{LABEL}}{value}")


#: Concurrent callers of a stale key, and how long one computation takes.
CALLERS = 50
COMPUTE_SECONDS = 0.2


@contextmanager
def measured(db: str) -> Iterator[dict[str, float]]:
    """Count the queries (on every database: a router may send reads to a replica) and the
    milliseconds of the block into the yielded dict; *db* names the database written to."""
    result: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        captures = [
            stack.enter_context(CaptureQueriesContext(connections[alias])) for alias in settings.DATABASES
        ]
        started = time.perf_counter()
        yield result
        result["ms"] = (time.perf_counter() - started) * 1000
    queries = [query for capture in captures for query in capture.captured_queries]
    result["queries"] = len(queries)
    result["counts"] = sum("COUNT(" in query["sql"].upper() for query in queries)


def _render_list(articles: Any) -> int:
    """What a list template does with each row: its section, author, tags and comment count."""
    cells = 0
    for article in articles:
        cells += len(article.section.name) + len(article.author.name)
        cells += len([tag.name for tag in article.tags.all()])
        cells += article.comments.count()
    return cells


def show_list_page(command: Command) -> None:
    """A list of articles with their section, author, tags and comment count, four ways."""
    db = conf.PRIMARY
    command.heading(f"A list page: {PAGE} articles with section, author, tags and comment count")
    # Article._base_manager is Django's plain Manager: what the page costs without django-scale.
    plain = Article._base_manager.db_manager(db).order_by("-published_at")
    ways: list[tuple[str, Callable[[], Any]]] = [
        ("naive loop (stock)", lambda: plain[:PAGE]),
        (
            "hand-tuned (stock)",
            lambda: (
                plain.select_related("section", "author")
                .prefetch_related("tags")
                .annotate(Count("comments"))[:PAGE]
            ),
        ),
    ]
    if django.VERSION >= (6, 1):
        from django.db.models import FETCH_PEERS  # type: ignore[attr-defined,unused-ignore]

        ways.append(("Django 6.1 FETCH_PEERS", lambda: plain.fetch_mode(FETCH_PEERS)[:PAGE]))  # type: ignore[attr-defined,unused-ignore]
    ways.append(
        ("django-scale, no lookups", lambda: Article.objects.db_manager(db).order_by("-published_at")[:PAGE])
    )
    for label, rows in ways:
        with measured(db) as m:
            if label.startswith("hand-tuned"):
                # The hand-tuned page reads the annotation instead of counting per row.
                for article in rows():
                    _ = (article.section.name, article.author.name, [t.name for t in article.tags.all()])
                    _ = article.comments__count
            else:
                _render_list(rows())
        row(command, label, f"{m['queries']:>4.0f} queries  {m['ms']:>7.1f} ms")
    if django.VERSION < (6, 1):
        row(command, "Django 6.1 FETCH_PEERS", "n/a on this Django (fetch modes arrived in 6.1)")


def show_changelist(command: Command) -> None:
    """The admin's article list with Django's ModelAdmin and with ScaleModelAdmin."""
    db = conf.PRIMARY
    command.heading("The admin's article list: ModelAdmin against ScaleModelAdmin")
    scaled = admin.site._registry[Article]  # the project's ArticleAdmin
    settings_of = {
        name: getattr(scaled, name)
        for name in ("list_display", "list_filter", "list_select_related", "search_fields", "date_hierarchy")
    }
    stock = type("StockArticleAdmin", (admin.ModelAdmin,), settings_of)(Article, admin.site)
    user = get_user_model().objects.db_manager(db).filter(is_superuser=True).first()
    if user is None:
        row(command, "skipped", "no superuser (DEBUG is off)")
        return
    for label, model_admin in (("ModelAdmin (stock)", stock), ("ScaleModelAdmin", scaled)):
        request = RequestFactory().get("/admin/news/article/")
        request.user = user
        with measured(db) as m:
            response = model_admin.changelist_view(request)
            response.render()
        row(command, label, f"{m['queries']:>4.0f} queries  {m['counts']:>3.0f} COUNT(*)  {m['ms']:>7.1f} ms")


def show_stale_key(command: Command) -> None:
    """A popular value that just expired, read by many at once: how many times is it computed?"""
    command.heading(
        f"{CALLERS} concurrent callers of an expired key ({COMPUTE_SECONDS * 1000:.0f} ms to compute)"
    )
    computed = {"get_or_set": 0, "swr": 0}
    lock = threading.Lock()

    def expensive(kind: str) -> int:
        with lock:
            computed[kind] += 1
        time.sleep(COMPUTE_SECONDS)
        return 42

    @stale_while_revalidate(fresh=0.2, stale=60, refill="inline")
    def headline_count() -> int:
        return expensive("swr")

    def stock() -> int:
        return cache.get_or_set("demo:headline-count", lambda: expensive("get_or_set"), timeout=0.2)  # type: ignore[arg-type]

    for label, call in (("get_or_set (stock)", stock), ("stale_while_revalidate", headline_count)):
        call()  # warm
        time.sleep(0.3)  # the value expires
        kind = "swr" if call is headline_count else "get_or_set"
        before = computed[kind]
        waits: list[float] = []

        def caller(call: Callable[[], int] = call, waits: list[float] = waits) -> None:
            started = time.perf_counter()
            call()
            with lock:
                waits.append((time.perf_counter() - started) * 1000)

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        waits.sort()
        row(
            command,
            label,
            f"{computed[kind] - before:>4} computations  median caller waits {waits[len(waits) // 2]:>6.1f} ms",
        )
        connections.close_all()
    cache.delete("demo:headline-count")


def show_n_plus_one(command: Command) -> None:
    """N+1 detection: a loop that filters each row's comments, caught and named."""
    db = conf.PRIMARY
    command.heading("N+1 detection: a loop that filters each article's comments")
    try:
        with detect_n_plus_one("raise"):
            for article in Article.objects.db_manager(db).order_by("-published_at")[:20]:
                article.comments.filter(author_name__startswith="A").count()
    except NPlusOneError as error:
        row(command, "caught", str(error).split(". ")[0] + ".")
    else:
        row(command, "caught", "nothing (unexpected)")


def show_statement_timeout(command: Command) -> None:
    """A runaway query stopped by statement_timeout()."""
    db = conf.PRIMARY
    command.heading("A runaway query under statement_timeout(0.5)")
    runaway = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
        if connections[db].vendor == "sqlite"
        else "SELECT count(*) FROM generate_series(1, 10000000000)"
    )
    started = time.perf_counter()
    try:
        with statement_timeout(0.5, using=db), connections[db].cursor() as cursor:
            cursor.execute(runaway)
        outcome, error_name = "finished (unexpected)", ""
    except Exception as error:
        if not is_statement_timeout(error):
            raise
        outcome, error_name = "stopped", f" ({type(error).__name__})"
    row(command, outcome, f"after {(time.perf_counter() - started) * 1000:.0f} ms{error_name}")


#: The sections, in the order the demo prints them.
WINS: tuple[Callable[[Command], None], ...] = (
    show_list_page,
    show_changelist,
    show_stale_key,
    show_n_plus_one,
    show_statement_timeout,
)
