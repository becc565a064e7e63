"""``bench bulk``: rows per second of Django's ways to load, update and export rows, and django-scale's.

Side by side in one run, on the same table (the newsroom's comments, four columns, a foreign key
and two indexes), on the same number of rows:

* inserts: a ``save()`` loop (timed on a sample), ``bulk_create``, django-postgres-copy (the
  instances written to CSV, then ``CopyMapping``), ``copy_from`` from instances and from
  tuples, and ``INSERT ... SELECT`` generated in the server as the ceiling;
* updates: ``bulk_update`` without a ``batch_size`` (on small sizes: it is super-linear),
  ``bulk_update(batch_size=1000)`` and ``copy_update``, at two sizes to show (non-)linearity;
* export: ``csv.writer`` over ``values_list().iterator()``, django-postgres-copy's ``to_csv``
  and ``copy_to``, with the peak Python memory (tracemalloc) at two sizes.

``--rows`` sets the size (default 100,000; ``--quick``: 10,000).
"""

from __future__ import annotations

import csv
import io
import os
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TextIO

from django.db import connection
from django.utils import timezone

from django_scale.bulk import copy_from, copy_to, copy_update
from django_scale.replicas import use_primary

from benchmarks import print_table
from news.models import Article, Author, Comment, Section

SAVE_SAMPLE = 2_000
BULK_UPDATE_UNBATCHED = (1_000, 2_000, 4_000)


def bench_article() -> Article:
    section = Section.objects.get_or_create(slug="bench-bulk", defaults={"name": "Bench bulk"})[0]
    author = Author.objects.get_or_create(name="Bench bulk author")[0]
    return Article.objects.get_or_create(
        slug="bench-bulk", defaults={"section": section, "author": author, "title": "Bench bulk", "body": ""}
    )[0]


def clear(article: Article) -> None:
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM news_comment WHERE article_id = %s", [article.pk])


def instances(article: Article, rows: int) -> list[Comment]:
    now = timezone.now()
    return [
        Comment(
            article=article,
            author_name=f"Reader {n}",
            body=f"Comment {n}\twith a tab",
            created_at=now - timedelta(seconds=n),
        )
        for n in range(rows)
    ]


def tuples(article: Article, rows: int) -> list[tuple[Any, ...]]:
    now = timezone.now()
    return [
        (article.pk, f"Reader {n}", f"Comment {n}\twith a tab", now - timedelta(seconds=n))
        for n in range(rows)
    ]


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def postgres_copy_available() -> bool:
    try:
        import postgres_copy  # noqa: F401
    except ImportError:
        return False
    return connection.vendor == "postgresql"


def pg_copy_from_instances(objects: list[Comment]) -> None:
    """What a django-postgres-copy user does with instances: write a CSV, then CopyMapping it."""
    from postgres_copy import CopyMapping

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["article", "author_name", "body", "created_at"])
    for comment in objects:
        writer.writerow(
            [comment.article_id, comment.author_name, comment.body, comment.created_at.isoformat()]
        )
    buffer.seek(0)
    mapping = CopyMapping(
        Comment,
        buffer,
        {"article": "article", "author_name": "author_name", "body": "body", "created_at": "created_at"},
    )
    mapping.save(silent=True)


def inserts(out: TextIO, article: Article, rows: int) -> None:
    results: list[tuple[str, int, float]] = []

    sample = min(rows, SAVE_SAMPLE)
    objects = instances(article, sample)
    seconds = timed(lambda: [comment.save() for comment in objects])
    results.append((f"save() loop ({sample:,}-row sample)", sample, seconds))
    clear(article)

    objects = instances(article, rows)
    results.append(("bulk_create()", rows, timed(lambda: Comment.objects.bulk_create(objects))))
    clear(article)

    if postgres_copy_available():
        objects = instances(article, rows)
        results.append(
            ("django-postgres-copy (CSV + CopyMapping)", rows, timed(lambda: pg_copy_from_instances(objects)))
        )
        clear(article)

    objects = instances(article, rows)
    results.append(("django-scale copy_from(instances)", rows, timed(lambda: copy_from(Comment, objects))))
    clear(article)

    values = tuples(article, rows)
    fields = ["article", "author_name", "body", "created_at"]
    results.append(
        ("django-scale copy_from(tuples)", rows, timed(lambda: copy_from(Comment, values, fields=fields)))
    )
    clear(article)

    if connection.vendor == "postgresql":

        def insert_select() -> None:
            with connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO news_comment (article_id, author_name, body, created_at) "
                    "SELECT %s, 'Reader ' || n, 'Comment ' || n, now() - n * interval '1 second' "
                    "FROM generate_series(1, %s) AS n",
                    [article.pk, rows],
                )

        results.append(("INSERT ... SELECT in the server (ceiling)", rows, timed(insert_select)))
        clear(article)

    save_rate = rate(results[0][1], results[0][2])
    bulk_rate = rate(results[1][1], results[1][2])
    print_table(
        out,
        f"Inserts, {rows:,} rows ({connection.vendor})",
        ["method", "rows/s", "x save()", "x bulk_create"],
        [
            (name, f"{rate(n, s):,.0f}", f"{rate(n, s) / save_rate:.1f}", f"{rate(n, s) / bulk_rate:.2f}")
            for name, n, s in results
        ],
    )


def updates(out: TextIO, article: Article, rows: int) -> None:
    copy_from(Comment, tuples(article, rows), fields=["article", "author_name", "body", "created_at"])
    comments = list(Comment.objects.filter(article=article).order_by("pk"))
    results: list[tuple[str, int, float]] = []

    def changed(count: int, mark: str) -> list[Comment]:
        for comment in comments[:count]:
            comment.body = f"{mark} {comment.pk}"
        return comments[:count]

    for size in BULK_UPDATE_UNBATCHED:
        if size > rows:
            continue
        batch = changed(size, "u")
        results.append(
            (
                "bulk_update(), no batch_size",
                size,
                timed(lambda batch=batch: Comment.objects.bulk_update(batch, ["body"])),
            )
        )
    for size in sorted({rows // 10, rows}):
        batch = changed(size, "b")
        results.append(
            (
                "bulk_update(batch_size=1000)",
                size,
                timed(lambda batch=batch: Comment.objects.bulk_update(batch, ["body"], batch_size=1000)),
            )
        )
    for size in sorted({rows // 10, rows}):
        batch = changed(size, "c")
        results.append(
            (
                "django-scale copy_update()",
                size,
                timed(lambda batch=batch: copy_update(Comment, batch, fields=["body"])),
            )
        )
    for size in sorted({rows // 10, rows}):
        values = [(comment.pk, f"t {comment.pk}") for comment in comments[:size]]
        results.append(
            (
                "django-scale copy_update(tuples)",
                size,
                timed(lambda values=values: copy_update(Comment, values, fields=["body"])),
            )
        )
    clear(article)
    print_table(
        out,
        f"Updates of one column ({connection.vendor}); linear = the same rows/s at both sizes",
        ["method", "rows", "rows/s", "seconds"],
        [(name, f"{n:,}", f"{rate(n, s):,.0f}", f"{s:.2f}") for name, n, s in results],
    )


def export(out: TextIO, article: Article, rows: int) -> None:
    now = timezone.now()
    copy_from(
        Comment,
        (
            (article.pk, f"Reader {n}", f"Comment {n} " + "x" * 100, now - timedelta(seconds=n))
            for n in range(rows)
        ),
        fields=["article", "author_name", "body", "created_at"],
    )
    queryset = Comment.objects.filter(article=article).values_list(
        "id", "article_id", "author_name", "body", "created_at"
    )

    def stock(count: int) -> None:
        with open(os.devnull, "w", newline="") as sink:
            writer = csv.writer(sink)
            for row in queryset.order_by("pk")[:count].iterator(chunk_size=2000):
                writer.writerow(row)

    def scale(count: int) -> None:
        with open(os.devnull, "w") as sink:
            copy_to(queryset.order_by("pk")[:count], sink)

    def pg_copy(count: int) -> None:
        from postgres_copy import CopyQuerySet

        with open(os.devnull, "w") as sink:
            ids = CopyQuerySet(model=Comment).filter(article=article).order_by("pk")
            ids.filter(pk__lte=ids.values_list("pk", flat=True)[count - 1 : count]).to_csv(
                sink, "id", "article_id", "author_name", "body", "created_at"
            )

    methods: list[tuple[str, Callable[[int], None]]] = [("csv.writer over iterator(chunk_size=2000)", stock)]
    if postgres_copy_available():
        methods.append(("django-postgres-copy to_csv()", pg_copy))
    methods.append(("django-scale copy_to()", scale))
    small = max(rows // 10, 1)
    table = []
    for name, method in methods:
        seconds = timed(lambda method=method: method(rows))
        peaks = []
        for count in (small, rows):
            tracemalloc.start()
            method(count)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        table.append((name, f"{rate(rows, seconds):,.0f}", f"{peaks[0] / 1e6:.1f}", f"{peaks[1] / 1e6:.1f}"))
    clear(article)
    print_table(
        out,
        f"Export to a file ({connection.vendor}); flat memory = the same peak at both sizes",
        ["method", "rows/s", f"peak MB, {small:,} rows", f"peak MB, {rows:,} rows"],
        table,
    )


def run(out: TextIO, quick: bool = False, rows: int | None = None) -> None:
    rows = rows or (10_000 if quick else 100_000)
    with use_primary():
        article = bench_article()
        clear(article)
        out.write(f"  {rows:,} rows per method\n")
        if connection.vendor != "postgresql":
            out.write("  not PostgreSQL: django-scale falls back to bulk_create / bulk_update in batches\n")
        inserts(out, article, rows)
        updates(out, article, rows)
        export(out, article, rows)
