"""``bench indexes``: the index advisor on the admin changelist's status filter.

The article table is filled with generated rows of which one in 500 is a draft, and the index
that serves the status filter (``news_article_status_latest``) is dropped: the changelist's
"drafts" page then walks the ``published_at`` index backwards, reading ~500 rows for each row
it shows. The benchmark runs the changelist's queries, then asks the advisor in two ways, side
by side: django-scale's (the slow-query log's real parameters, else a generic plan) and
dexter's (every parameter ``NULL``). It builds what django-scale proposes and times the page
again; ``--verify`` figures come from ``pg_stat_statements``.
"""

from __future__ import annotations

import statistics
import time
from typing import TextIO

from django.db import connection

from django_scale import slowlog
from django_scale.indexes.advisor import Advice, advise
from django_scale.indexes.migration import save_baseline, verify

from benchmarks import print_table, time_per_call
from news.models import Article, Author, Section

#: The index the example project declares for the status filter; dropped to start "before".
SERVING_INDEX = "news_article_status_latest"


def fill(rows: int) -> None:
    """Make the article table hold *rows* generated rows, one in 500 a draft; ANALYZE it."""
    section = Section.objects.using("default").get_or_create(slug="bench-idx", defaults={"name": "Bench"})[0]
    author = Author.objects.using("default").get_or_create(name="Bench author")[0]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM news_article")
        have = cursor.fetchone()[0]
        if have < rows:
            cursor.execute(
                """
                INSERT INTO news_article (section_id, author_id, title, slug, body, published_at, status, views)
                SELECT %s, %s, 'Article ' || n, 'bench-idx-' || n, '',
                       now() - n * interval '1 minute',
                       CASE WHEN n %% 500 = 0 THEN 'draft' ELSE 'published' END, 0
                  FROM generate_series(%s, %s) AS n
                """,
                [section.pk, author.pk, have + 1, rows],
            )
        cursor.execute(f'DROP INDEX IF EXISTS "{SERVING_INDEX}"')
        cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        cursor.execute("CREATE EXTENSION IF NOT EXISTS hypopg")
        cursor.execute("ANALYZE news_article")


def _index_names() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'news_article'")
        return {str(row[0]) for row in cursor.fetchall()}


def _server_totals() -> dict[str, tuple[int, float]]:
    """Calls and total ms of the two changelist statements, from ``pg_stat_statements``."""
    totals: dict[str, tuple[int, float]] = {}
    with connection.cursor() as cursor:
        cursor.execute(
            # Not the advisor's own EXPLAINs of these statements (utility statements, tracked too).
            "SELECT query, calls, total_exec_time FROM pg_stat_statements "
            "WHERE query LIKE %s AND query LIKE %s AND query ~* '^\\s*SELECT'",
            ['%FROM "news_article"%', '%ORDER BY "news_article"."published_at" DESC%'],
        )
        for query, calls, total in cursor.fetchall():
            name = "status = draft page" if '"news_article"."status" =' in query else "unfiltered page"
            old = totals.get(name, (0, 0.0))
            totals[name] = (old[0] + int(calls), old[1] + float(total))
    return totals


def changelist_page(status: str | None) -> list[Article]:
    """The rows of the changelist's first page, as ScaleModelAdmin asks for them (on the primary)."""
    articles = Article.objects.using("default").select_related("section", "author")
    if status:
        articles = articles.filter(status=status)
    return list(articles.order_by("-published_at", "-pk")[:100])


def _proposal(advice: Advice) -> str:
    found = [s for s in advice.suggestions if s.candidate.table == "news_article"]
    if not found:
        return "nothing"
    best = max(found, key=lambda s: max(p.cut for p in s.statements))
    cut = max(p.cut for p in best.statements)
    return f"{best.candidate.definition} (-{cut:.0%} cost)"


def _plan_outline(status: str | None) -> str:
    """The node lines of the page's ``EXPLAIN (ANALYZE, BUFFERS)``, with the execution time."""
    articles = Article.objects.using("default").select_related("section", "author")
    if status:
        articles = articles.filter(status=status)
    text = articles.order_by("-published_at", "-pk")[:100].explain(analyze=True, buffers=True)
    keep = [
        line.strip() for line in text.splitlines() if "->" in line or "Execution" in line or "Buffers" in line
    ]
    return "\n    ".join([text.splitlines()[0].strip(), *keep])


class _PassThrough:
    """An execute wrapper that does nothing: the cost of Django's wrapper chain alone."""

    def __call__(self, execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        return execute(sql, params, many, context)


def slowlog_overhead(out: TextIO, quick: bool) -> None:
    """Print the cost per statement of the slow-query log's wrapper on a fast statement."""
    calls = 500 if quick else 3000
    with connection.cursor() as cursor:

        def statement() -> None:
            cursor.execute("SELECT 1")

        # Interleaved, several rounds, each figure the median of its rounds: the machine is shared.
        figures: dict[str, list[float]] = {
            "no wrapper (stock Django)": [],
            "pass-through wrapper": [],
            "slow-query log": [],
        }
        for _ in range(3):
            figures["no wrapper (stock Django)"].append(time_per_call(statement, calls=calls))
            with connection.execute_wrapper(_PassThrough()):
                figures["pass-through wrapper"].append(time_per_call(statement, calls=calls))
            with slowlog.recording("default", threshold_ms=100):
                figures["slow-query log"].append(time_per_call(statement, calls=calls))
    base = statistics.median(figures["no wrapper (stock Django)"])
    print_table(
        out,
        "Slow-query log on a fast statement (SELECT 1 on the primary), microseconds per statement",
        ["execute path", "us", "vs stock"],
        [
            [name, f"{statistics.median(v) * 1e6:.1f}", f"{statistics.median(v) / base:.3f}x"]
            for name, v in figures.items()
        ],
    )


def run(out: TextIO, quick: bool = False, rows: int | None = None) -> None:
    if connection.vendor != "postgresql":
        out.write("bench indexes needs PostgreSQL: set DATABASE_URL or DJANGO_SCALE_EXAMPLE_HARNESS=1.\n")
        raise SystemExit(2)
    rows = rows or (100_000 if quick else 1_000_000)
    slowlog_overhead(out, quick)
    started = time.perf_counter()
    fill(rows)
    out.write(f"  {rows:,} rows ready in {time.perf_counter() - started:.1f} s\n")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_statements_reset()")
    slowlog.reset()
    calls = 3 if quick else 10
    with slowlog.recording("default", threshold_ms=0):
        before = {
            "unfiltered page": time_per_call(lambda: changelist_page(None), calls=calls),
            "status = draft page": time_per_call(lambda: changelist_page("draft"), calls=calls),
        }
    out.write(f"  plan of the unfiltered page before:\n    {_plan_outline(None)}\n")
    server_before = _server_totals()
    slow = slowlog.slow_queries()
    ours = advise("default", slow=slow)
    dexter = advise("default", planning="null")
    save_baseline("default", ours.suggestions)
    proposals = [s for s in ours.suggestions if s.candidate.table == "news_article"]
    existing = _index_names()
    with connection.cursor() as cursor:
        for suggestion in proposals:
            cursor.execute(suggestion.candidate.definition)
        cursor.execute("ANALYZE news_article")
    built = _index_names() - existing
    with slowlog.recording("default", threshold_ms=0):
        after = {
            "unfiltered page": time_per_call(lambda: changelist_page(None), calls=calls),
            "status = draft page": time_per_call(lambda: changelist_page("draft"), calls=calls),
        }
    server_after = _server_totals()
    out.write(f"  plan of the unfiltered page after:\n    {_plan_outline(None)}\n")
    server = {}
    for name, (calls, total) in server_before.items():
        later_calls, later_total = server_after.get(name, (calls, total))
        since = later_calls - calls
        server[name] = (total / calls, (later_total - total) / since if since else float("nan"))
    print_table(
        out,
        f"Changelist first page, {rows:,} rows, server mean ms (pg_stat_statements)",
        ["page", "before", "after", "ratio"],
        [[name, f"{b:.2f}", f"{a:.2f}", f"{b / a:.1f}x"] for name, (b, a) in sorted(server.items())],
    )
    print_table(
        out,
        f"Changelist first page, {rows:,} rows, client median ms (index built from django-scale's proposal)",
        ["page", "before", "after", "ratio"],
        [
            [
                name,
                f"{before[name] * 1000:.2f}",
                f"{after[name] * 1000:.2f}",
                f"{before[name] / after[name]:.1f}x",
            ]
            for name in before
        ],
    )
    print_table(
        out,
        "What each way of planning proposes for the same statements",
        ["advisor", "proposes"],
        [
            ["django-scale (slow-log parameters / generic plan)", _proposal(ours)],
            ["dexter-style (NULL parameters)", _proposal(dexter)],
        ],
    )
    verified = [row for row in verify("default") if row[2] is not None]
    print_table(
        out,
        "scale_indexes --verify (pg_stat_statements mean, before -> since the index)",
        ["queryid", "before ms", "since ms", "calls since"],
        [[str(q), f"{b:.2f}", f"{s:.2f}", str(n)] for q, b, s, n in verified if s is not None],
    )
    # Leave the table as the example project declares it.
    with connection.cursor() as cursor:
        for name in built:
            cursor.execute(f'DROP INDEX IF EXISTS "{name}"')
        cursor.execute(
            f'CREATE INDEX IF NOT EXISTS "{SERVING_INDEX}" ON news_article (status, published_at DESC)'
        )
