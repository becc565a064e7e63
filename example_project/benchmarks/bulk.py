"""``bench bulk``: rows per second of Django's ways to load, update and export rows, and django-scale's.

Side by side in one run, on the same number of rows, into two tables shaped like the
newsroom's comments (four columns and a foreign key): ``bench_comment`` has the real table's
two indexes and is WAL-logged (streamed to the replica, when there is one), as a production
load would be; ``bench_comment_bare`` is ``UNLOGGED`` without indexes, so what is left is
mostly the client's cost of preparing and sending rows. Tables are emptied with ``TRUNCATE``
before each method.

* inserts: a ``save()`` loop (timed on a sample), ``bulk_create``, django-postgres-copy (the
  instances written to CSV, then ``CopyMapping``), ``copy_from`` from instances and from
  tuples, and ``INSERT ... SELECT`` generated in the server, the server's own ceiling;
* updates: ``bulk_update`` without a ``batch_size`` (small sizes only: it is super-linear),
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

from django.db import connection, models
from django.utils import timezone

from django_scale.bulk import copy_from, copy_to, copy_update
from django_scale.replicas import use_primary

from benchmarks import print_table
from news.models import Article, Author, Section

SAVE_SAMPLE = 2_000
BULK_UPDATE_UNBATCHED = (1_000, 2_000, 4_000, 8_000)
#: bulk_update(batch_size=1000) manages about 3k rows/s here: it gets at most this many rows.
BULK_UPDATE_MAX = 100_000
FIELDS = ["article", "author_name", "body", "created_at"]


class BenchRow(models.Model):
    """A comment-shaped row in a table the benchmark creates (not migrations)."""

    article = models.ForeignKey(Article, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    author_name = models.CharField(max_length=100)
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        abstract = True
        app_label = "news"

    def __str__(self) -> str:
        return self.author_name


class IndexedRow(BenchRow):
    class Meta:
        managed = False
        app_label = "news"
        db_table = "bench_comment"


class BareRow(BenchRow):
    class Meta:
        managed = False
        app_label = "news"
        db_table = "bench_comment_bare"


def create_tables() -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("DROP TABLE IF EXISTS bench_comment, bench_comment_bare")
            cursor.execute("CREATE TABLE bench_comment (LIKE news_comment INCLUDING ALL)")
            cursor.execute(
                "CREATE UNLOGGED TABLE bench_comment_bare (LIKE news_comment INCLUDING DEFAULTS INCLUDING IDENTITY)"
            )
        else:
            for table in ("bench_comment", "bench_comment_bare"):
                cursor.execute(f"DROP TABLE IF EXISTS {table}")
                cursor.execute(
                    f"CREATE TABLE {table} (id integer PRIMARY KEY AUTOINCREMENT, article_id bigint NOT NULL, "
                    "author_name varchar(100) NOT NULL, body text NOT NULL, created_at datetime NOT NULL)"
                )
            cursor.execute("CREATE INDEX bench_comment_article ON bench_comment (article_id, created_at)")


def drop_tables() -> None:
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_comment")
        cursor.execute("DROP TABLE IF EXISTS bench_comment_bare")


def empty(model: type[BenchRow]) -> None:
    table = model._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {table}" if connection.vendor == "postgresql" else f"DELETE FROM {table}")


def bench_article() -> Article:
    section = Section.objects.get_or_create(slug="bench-bulk", defaults={"name": "Bench bulk"})[0]
    author = Author.objects.get_or_create(name="Bench bulk author")[0]
    return Article.objects.get_or_create(
        slug="bench-bulk", defaults={"section": section, "author": author, "title": "Bench bulk", "body": ""}
    )[0]


def instances(model: type[BenchRow], article: Article, rows: int) -> list[BenchRow]:
    now = timezone.now()
    return [
        model(
            article=article,
            author_name=f"Reader {n}",
            body=f"Comment {n}\twith a tab",
            created_at=now - timedelta(seconds=n),
        )
        for n in range(rows)
    ]


def tuples(article: Article, rows: int, body: str = "\twith a tab") -> list[tuple[Any, ...]]:
    now = timezone.now()
    return [
        (article.pk, f"Reader {n}", f"Comment {n}{body}", now - timedelta(seconds=n)) for n in range(rows)
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


def pg_copy_from_instances(model: type[BenchRow], objects: list[BenchRow]) -> None:
    """What a django-postgres-copy user does with instances: write a CSV, then CopyMapping it."""
    from postgres_copy import CopyMapping

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FIELDS)
    for row in objects:
        writer.writerow([row.article_id, row.author_name, row.body, row.created_at.isoformat()])
    buffer.seek(0)
    CopyMapping(model, buffer, {name: name for name in FIELDS}).save(silent=True)


def insert_methods(model: type[BenchRow], article: Article, rows: int) -> list[tuple[str, int, float]]:
    """Time each insert method into *model*'s table; return ``(method, rows, seconds)``."""
    results: list[tuple[str, int, float]] = []

    def measure(name: str, count: int, prepare: Callable[[], Any], load: Callable[[Any], object]) -> None:
        empty(model)
        data = prepare()
        results.append((name, count, timed(lambda: load(data))))

    sample = min(rows, SAVE_SAMPLE)
    measure(
        f"save() loop ({sample:,}-row sample)",
        sample,
        lambda: instances(model, article, sample),
        lambda objects: [row.save() for row in objects],
    )
    measure("bulk_create()", rows, lambda: instances(model, article, rows), model.objects.bulk_create)
    if postgres_copy_available():
        measure(
            "django-postgres-copy (CSV + CopyMapping)",
            rows,
            lambda: instances(model, article, rows),
            lambda objects: pg_copy_from_instances(model, objects),
        )
    measure(
        "django-scale copy_from(instances)",
        rows,
        lambda: instances(model, article, rows),
        lambda objects: copy_from(model, objects),
    )
    measure(
        "django-scale copy_from(tuples)",
        rows,
        lambda: tuples(article, rows),
        lambda values: copy_from(model, values, fields=FIELDS),
    )
    if connection.vendor == "postgresql":

        def insert_select(_: object) -> None:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {model._meta.db_table} (article_id, author_name, body, created_at) "
                    "SELECT %s, 'Reader ' || n, 'Comment ' || n || E'\\twith a tab', "
                    "now() - n * interval '1 second' FROM generate_series(1, %s) AS n",
                    [article.pk, rows],
                )

        measure("INSERT ... SELECT in the server (ceiling)", rows, lambda: None, insert_select)
    empty(model)
    return results


def inserts(out: TextIO, article: Article, rows: int) -> None:
    indexed = insert_methods(IndexedRow, article, rows)
    bare = insert_methods(BareRow, article, rows)
    save_rate = rate(indexed[0][1], indexed[0][2])
    bulk_rate = rate(indexed[1][1], indexed[1][2])
    bare_bulk = rate(bare[1][1], bare[1][2])
    pg_copy = {name: rate(n, s) for name, n, s in indexed if name.startswith("django-postgres-copy")}
    pg_copy_bare = {name: rate(n, s) for name, n, s in bare if name.startswith("django-postgres-copy")}
    rows_out = []
    for (name, n, seconds), (_, bare_n, bare_seconds) in zip(indexed, bare, strict=True):
        speed, bare_speed = rate(n, seconds), rate(bare_n, bare_seconds)
        rows_out.append(
            (
                name,
                f"{speed:,.0f}",
                f"{speed / save_rate:.1f}",
                f"{speed / bulk_rate:.2f}",
                f"{speed / next(iter(pg_copy.values())):.2f}" if pg_copy else "n/a",
                f"{bare_speed:,.0f}",
                f"{bare_speed / bare_bulk:.2f}",
                f"{bare_speed / next(iter(pg_copy_bare.values())):.2f}" if pg_copy_bare else "n/a",
            )
        )
    print_table(
        out,
        f"Inserts, {rows:,} rows ({connection.vendor}): indexed + logged table | unlogged table without indexes",
        [
            "method",
            "rows/s",
            "x save()",
            "x bulk_create",
            "x pg-copy",
            "bare rows/s",
            "x bulk_create",
            "x pg-copy",
        ],
        rows_out,
    )


def updates(out: TextIO, article: Article, rows: int) -> None:
    model = IndexedRow
    empty(model)
    copy_from(model, tuples(article, rows), fields=FIELDS)
    rows_read = list(model.objects.order_by("pk"))
    results: list[tuple[str, int, float]] = []

    def changed(count: int, mark: str) -> list[BenchRow]:
        for row in rows_read[:count]:
            row.body = f"{mark} {row.pk}"
        return rows_read[:count]

    for size in BULK_UPDATE_UNBATCHED:
        if size <= rows:
            batch = changed(size, "u")
            results.append(
                (
                    "bulk_update(), no batch_size",
                    size,
                    timed(lambda b=batch: model.objects.bulk_update(b, ["body"])),
                )
            )
    biggest = min(rows, BULK_UPDATE_MAX)
    for size in sorted({biggest // 10, biggest}):
        batch = changed(size, "b")
        results.append(
            (
                "bulk_update(batch_size=1000)",
                size,
                timed(lambda b=batch: model.objects.bulk_update(b, ["body"], batch_size=1000)),
            )
        )
    for size in sorted({rows // 10, rows}):
        batch = changed(size, "c")
        results.append(
            (
                "django-scale copy_update(instances)",
                size,
                timed(lambda b=batch: copy_update(model, b, fields=["body"])),
            )
        )
    for size in sorted({rows // 10, rows}):
        values = [(row.pk, f"t {row.pk}") for row in rows_read[:size]]
        results.append(
            (
                "django-scale copy_update(tuples)",
                size,
                timed(lambda v=values: copy_update(model, v, fields=["body"])),
            )
        )
    if connection.vendor == "postgresql":
        # The server's own cost of the same UPDATE ... FROM, its input already in a table.
        for size in sorted({rows // 10, rows}):
            with connection.cursor() as cursor:
                cursor.execute(
                    "CREATE TEMPORARY TABLE bench_source AS SELECT id, 's ' || id AS body "
                    "FROM bench_comment ORDER BY id LIMIT %s",
                    [size],
                )

                def update(cursor: Any = cursor) -> None:
                    cursor.execute(
                        "UPDATE bench_comment AS t SET body = s.body FROM bench_source AS s WHERE t.id = s.id"
                    )

                results.append(("UPDATE ... FROM a server-side table (ceiling)", size, timed(update)))
                cursor.execute("DROP TABLE bench_source")
    empty(model)
    print_table(
        out,
        f"Updates of one column, indexed table ({connection.vendor}); linear = the same rows/s at both sizes",
        ["method", "rows", "rows/s", "seconds"],
        [(name, f"{n:,}", f"{rate(n, s):,.0f}", f"{s:.2f}") for name, n, s in results],
    )


def export(out: TextIO, article: Article, rows: int) -> None:
    model = BareRow
    empty(model)
    copy_from(model, tuples(article, rows, body=" " + "x" * 100), fields=FIELDS)
    queryset = model.objects.values_list("id", "article_id", "author_name", "body", "created_at").order_by(
        "pk"
    )

    def stock(count: int) -> None:
        with open(os.devnull, "w", newline="") as sink:
            writer = csv.writer(sink)
            for row in queryset[:count].iterator(chunk_size=2000):
                writer.writerow(row)

    def scale(count: int) -> None:
        with open(os.devnull, "w") as sink:
            copy_to(queryset[:count], sink)

    def pg_copy(count: int) -> None:
        from postgres_copy import CopyQuerySet

        with open(os.devnull, "w") as sink:
            CopyQuerySet(model=model).order_by("pk").filter(pk__lte=count).to_csv(
                sink, "id", "article_id", "author_name", "body", "created_at"
            )

    methods: list[tuple[str, Callable[[int], None]]] = [("csv.writer over iterator(chunk_size=2000)", stock)]
    if postgres_copy_available():
        methods.append(("django-postgres-copy to_csv()", pg_copy))
    methods.append(("django-scale copy_to()", scale))
    small = max(rows // 10, 1)
    first = model.objects.order_by("pk").values_list("pk", flat=True).first() or 1
    table = []
    stock_rate = None
    for name, method in methods:
        # pg_copy filters on pk <= count: the ids start at `first`.
        count_for = (lambda n: first + n - 1) if method is pg_copy else (lambda n: n)
        speed = rate(rows, timed(lambda m=method, c=count_for: m(c(rows))))
        stock_rate = stock_rate or speed
        peaks = []
        for count in (small, rows):
            tracemalloc.start()
            method(count_for(count))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        table.append(
            (
                name,
                f"{speed:,.0f}",
                f"{speed / stock_rate:.1f}",
                f"{peaks[0] / 1e6:.2f}",
                f"{peaks[1] / 1e6:.2f}",
            )
        )
    empty(model)
    print_table(
        out,
        f"Export to a file ({connection.vendor}); flat memory = the same peak at both sizes",
        ["method", "rows/s", "x csv.writer", f"peak MB, {small:,} rows", f"peak MB, {rows:,} rows"],
        table,
    )


def run(out: TextIO, quick: bool = False, rows: int | None = None) -> None:
    rows = rows or (10_000 if quick else 100_000)
    with use_primary():
        article = bench_article()
        create_tables()
        try:
            out.write(f"  {rows:,} rows per method\n")
            if connection.vendor != "postgresql":
                out.write(
                    "  not PostgreSQL: django-scale falls back to bulk_create / bulk_update in batches\n"
                )
            inserts(out, article, rows)
            updates(out, article, rows)
            export(out, article, rows)
        finally:
            drop_tables()
