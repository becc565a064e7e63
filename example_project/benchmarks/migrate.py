"""``bench migrate``: the seed's migration, a table moved from an old database to a new schema.

The write-up behind django-scale copied a 250,000-row ``character`` table from an old schema
to a new one with Django's multi-db support: "Time with Django, over 2 hours; time dumping in
SQL, about 20 seconds". Here: ``character(id, publisher_id, name)`` in the ``legacy`` database
becomes ``character(id, publisher_id, nickname, secret_identity)`` in ``default`` (the same
table name in both, as in the write-up), ``nickname`` the old ``name`` and ``secret_identity``
the constant ``"Clark Kent"``. Side by side, the target emptied before each method:

* the ORM loop of the write-up, ``save()`` per row (timed on a sample, extrapolated);
* ``bulk_create`` in batches of 2,000 over ``iterator()``;
* django-postgres-copy: ``to_csv`` from the old table, ``CopyMapping`` into the new one;
* ``copy_between`` (the pipe): one call, renames and the constant in ``values()``;
* a Python transform (``name.title()``): ``iter_batches(values_list())`` + ``copy_from``;
* the SQL ceilings, no Python: ``pg_dump -t character | psql`` into a database with the old
  schema, and ``psql -c "COPY (SELECT ...) TO STDOUT" | psql -c "COPY ... FROM STDIN"`` (binary),
  the same transform as the pipe's.

Needs the ``legacy`` alias (``LEGACY_DATABASE_URL``, set by ``DJANGO_SCALE_EXAMPLE_HARNESS=1``)
and ``pg_dump``/``psql`` on ``PATH``. The ``COPY``-speed methods run three times each, the
median shown; the ORM loop and ``bulk_create`` once. Sizes: 250,000 and 1,000,000 rows (``--quick``: 20,000;
``--rows`` to choose).
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any, TextIO

from django.core.management.base import CommandError
from django.db import connections, models
from django.db.models import F, Value

from django_scale.bulk import copy_between, copy_from, iter_batches

from benchmarks import print_table

SIZES = (250_000, 1_000_000)
QUICK_SIZES = (20_000,)
ORM_SAMPLE = 5_000
BATCH = 2_000
SECRET = "Clark Kent"
#: The COPY-speed methods run this many times each, the median shown: a shared machine's noise.
COPY_REPEATS = 3


class OldCharacter(models.Model):
    id = models.IntegerField(primary_key=True)
    publisher_id = models.IntegerField()
    name = models.CharField(max_length=50)

    class Meta:
        managed = False
        app_label = "news"
        db_table = "character"

    def __str__(self) -> str:
        return self.name


class NewCharacter(models.Model):
    id = models.IntegerField(primary_key=True)
    publisher_id = models.IntegerField()
    nickname = models.CharField(max_length=50)
    secret_identity = models.CharField(max_length=50)

    class Meta:
        managed = False
        app_label = "news"
        db_table = "character"

    def __str__(self) -> str:
        return self.nickname


OLD_TABLE = "CREATE TABLE character (id integer PRIMARY KEY, publisher_id integer NOT NULL, name varchar(50) NOT NULL)"
NEW_TABLE = (
    "CREATE TABLE character (id integer PRIMARY KEY, publisher_id integer NOT NULL, "
    "nickname varchar(50) NOT NULL, secret_identity varchar(50) NOT NULL)"
)


def _execute(alias: str, *statements: str) -> None:
    with connections[alias].cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def _libpq(alias: str) -> dict[str, str]:
    """The environment psql and pg_dump need to reach *alias*'s database."""
    settings = connections[alias].settings_dict
    env = dict(os.environ, PGOPTIONS="-c client_min_messages=warning")
    env.update(
        PGHOST=str(settings["HOST"] or ""),
        PGPORT=str(settings["PORT"] or ""),
        PGUSER=str(settings["USER"] or ""),
        PGPASSWORD=str(settings["PASSWORD"] or ""),
        PGDATABASE=str(settings["NAME"]),
    )
    return env


def _shell(command: str, env: dict[str, str]) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env, check=True, stdout=subprocess.DEVNULL)


def prepare(rows: int) -> None:
    _execute("legacy", "DROP TABLE IF EXISTS character", OLD_TABLE)
    _execute(
        "legacy",
        f"INSERT INTO character SELECT n, 1 + n % 40, 'hero number ' || n FROM generate_series(1, {rows:d}) AS n",
        "ANALYZE character",
    )
    _execute("default", "DROP TABLE IF EXISTS character", NEW_TABLE)


def empty() -> None:
    _execute("default", "TRUNCATE character")


def _orm_loop(sample: int) -> None:
    for old in OldCharacter.objects.using("legacy").order_by("id")[:sample]:
        NewCharacter(
            id=old.id, publisher_id=old.publisher_id, nickname=old.name, secret_identity=SECRET
        ).save(using="default", force_insert=True)


def _bulk_create() -> None:
    batch: list[NewCharacter] = []
    for old in OldCharacter.objects.using("legacy").iterator(chunk_size=BATCH):
        batch.append(
            NewCharacter(id=old.id, publisher_id=old.publisher_id, nickname=old.name, secret_identity=SECRET)
        )
        if len(batch) == BATCH:
            NewCharacter.objects.using("default").bulk_create(batch)
            batch = []
    NewCharacter.objects.using("default").bulk_create(batch)


def _postgres_copy() -> None:
    from postgres_copy import CopyMapping, CopyQuerySet

    buffer = io.StringIO()
    CopyQuerySet(model=OldCharacter, using="legacy").to_csv(buffer, "id", "publisher_id", "name")
    buffer.seek(0)
    CopyMapping(
        NewCharacter,
        buffer,
        {"id": "id", "publisher_id": "publisher_id", "nickname": "name"},
        static_mapping={"secret_identity": SECRET},
        using="default",
    ).save(silent=True)


def _pipe() -> None:
    source = OldCharacter.objects.using("legacy").values(
        "id", "publisher_id", nickname=F("name"), secret_identity=Value(SECRET)
    )
    copy_between(source, NewCharacter, using="default")


def _python_transform() -> None:
    source = OldCharacter.objects.using("legacy").values_list("id", "publisher_id", "name")
    for batch in iter_batches(source, 50_000):
        copy_from(
            NewCharacter,
            [(id_, publisher, name.title(), SECRET) for id_, publisher, name in batch],
            fields=["id", "publisher_id", "nickname", "secret_identity"],
            using="default",
        )


def _pg_dump(dump_env: dict[str, str], legacy_env: dict[str, str]) -> Callable[[], None]:
    def run() -> None:
        _shell(
            f"pg_dump --data-only -t character '{legacy_env['PGDATABASE']}' | psql -q -v ON_ERROR_STOP=1",
            {**legacy_env, **{k: v for k, v in dump_env.items() if k == "PGDATABASE"}},
        )

    return run


def _psql_pipe(legacy_env: dict[str, str], default_env: dict[str, str]) -> None:
    out = (
        f"PGDATABASE='{legacy_env['PGDATABASE']}' psql -q -c \"COPY (SELECT id, publisher_id, name, "
        f"'{SECRET}'::varchar FROM character) TO STDOUT (FORMAT BINARY)\""
    )
    into = 'psql -q -v ON_ERROR_STOP=1 -c "COPY character (id, publisher_id, nickname, secret_identity) FROM STDIN (FORMAT BINARY)"'
    _shell(f"{out} | {into}", default_env)


def _dump_database() -> dict[str, str]:
    """A third database with the old schema: where ``pg_dump -t character | psql`` loads."""
    name = f"{connections['default'].settings_dict['NAME']}_dump"
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    env = {**_libpq("default"), "PGDATABASE": name}
    _shell(f'psql -q -v ON_ERROR_STOP=1 -c "DROP TABLE IF EXISTS character; {OLD_TABLE}"', env)
    return env


def run(out: TextIO, quick: bool, sizes: list[int] | None = None) -> None:
    if "legacy" not in connections:
        raise CommandError(
            "bench migrate needs a `legacy` database: set LEGACY_DATABASE_URL, or run with "
            "DJANGO_SCALE_EXAMPLE_HARNESS=1."
        )
    if connections["default"].vendor != "postgresql" or connections["legacy"].vendor != "postgresql":
        raise CommandError("bench migrate compares COPY paths: both databases must be PostgreSQL.")
    for tool in ("psql", "pg_dump"):
        if shutil.which(tool) is None:
            raise CommandError(f"{tool} is not on PATH (e.g. PATH=/usr/lib/postgresql/15/bin:$PATH).")
    driver = connections["default"].Database.__name__
    legacy_env, default_env = _libpq("legacy"), _libpq("default")
    for rows in sizes or (QUICK_SIZES if quick else SIZES):
        prepare(rows)
        dump_env = _dump_database()
        results: list[tuple[str, float]] = []

        def measure(
            name: str,
            work: Callable[[], Any],
            scale: float = 1.0,
            clear: Callable[[], None] = empty,
            results: list[tuple[str, float]] = results,
            repeats: int = 1,
        ) -> None:
            samples = []
            for _ in range(repeats):
                clear()
                started = time.perf_counter()
                work()
                samples.append((time.perf_counter() - started) * scale)
            results.append((name, statistics.median(samples)))

        sample = min(rows, ORM_SAMPLE)
        measure(
            f"ORM save() loop (the write-up's; {sample:,}-row sample, extrapolated)",
            lambda sample=sample: _orm_loop(sample),
            rows / sample,
        )
        measure("bulk_create() in batches of 2,000", _bulk_create)
        try:
            import postgres_copy  # noqa: F401

            measure("django-postgres-copy (to_csv + CopyMapping)", _postgres_copy, repeats=COPY_REPEATS)
        except ImportError:
            pass
        measure("django-scale copy_between() (the pipe)", _pipe, repeats=COPY_REPEATS)
        pipe_copied = NewCharacter.objects.using("default").count()
        measure(
            "django-scale iter_batches(values_list) + copy_from (Python transform)",
            _python_transform,
            repeats=COPY_REPEATS,
        )

        def clear_dump(dump_env: dict[str, str] = dump_env) -> None:
            _shell('psql -q -c "TRUNCATE character"', dump_env)

        measure(
            "pg_dump -t character | psql (old schema, no transform)",
            _pg_dump(dump_env, legacy_env),
            repeats=COPY_REPEATS,
            clear=clear_dump,
        )
        measure(
            "psql COPY TO | psql COPY FROM (binary, the same transform)",
            lambda: _psql_pipe(legacy_env, default_env),
            repeats=COPY_REPEATS,
        )
        if pipe_copied != rows:
            raise CommandError(f"the pipe copied {pipe_copied} rows of {rows}")
        ceiling = next(seconds for name, seconds in results if name.startswith("pg_dump"))
        table = [
            (name, f"{seconds:.2f}", f"{rows / seconds:,.0f}", f"{seconds / ceiling:.2f}x")
            for name, seconds in results
        ]
        print_table(
            out,
            f"migrate {rows:,} rows legacy -> default ({driver})",
            ("method", "seconds", "rows/s", "vs pg_dump|psql"),
            table,
        )
    _execute("legacy", "DROP TABLE IF EXISTS character")
    _execute("default", "DROP TABLE IF EXISTS character")
