"""Index checks (no database) and the ``scale_indexes`` advisor on a seeded table."""

# The models these tests declare exist for their indexes only.
# ruff: noqa: DJ008
from __future__ import annotations

import importlib.util
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib import admin
from django.core.management import call_command
from django.db import connection, connections, models
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import isolate_apps

from django_scale import slowlog
from django_scale.admin import ScaleModelAdmin
from django_scale.indexes import TrigramIndex, serving_index
from django_scale.indexes.advisor import advise
from django_scale.indexes.checks import check_model
from django_scale.indexes.migration import write_migration
from django_scale.indexes.stats import duplicate_indexes, unused_indexes

from testapp.models import Ticket


def _ids(messages: list[Any]) -> list[str]:
    return sorted(message.id for message in messages)


def test_trigram_index_keeps_its_import_path() -> None:
    index = TrigramIndex(fields=["title"], name="t_title_trgm")
    assert index.deconstruct()[0] == "django_scale.indexes.TrigramIndex"


# -- Checks --------------------------------------------------------------------------------


@isolate_apps("testapp")
def test_default_ordering_without_and_with_a_serving_index() -> None:
    class Story(models.Model):
        published = models.DateTimeField()
        title = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"
            ordering = ["-published", "title"]

    (message,) = check_model(Story)
    assert message.id == "django_scale.W404"
    assert message.obj is Story
    assert (
        "models.Index(fields=['-published', 'title'], name='testapp_story_published_title')" in message.hint
    )

    class Served(models.Model):
        published = models.DateTimeField()
        title = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"
            ordering = ["-published", "title"]
            # Read backwards, (published, -title) serves (-published, title).
            indexes = [models.Index(fields=["published", "-title"], name="served_idx")]

    assert check_model(Served) == []


@isolate_apps("testapp")
def test_foreign_key_with_its_index_off() -> None:
    class Owner(models.Model):
        class Meta:
            app_label = "testapp"

    class Pet(models.Model):
        owner = models.ForeignKey(Owner, models.CASCADE, db_index=False)

        class Meta:
            app_label = "testapp"

    (message,) = check_model(Pet)
    assert message.id == "django_scale.W405"
    assert "models.Index(fields=['owner']" in message.hint

    class Toy(models.Model):
        owner = models.ForeignKey(Owner, models.CASCADE, db_index=False)
        bought = models.DateField()

        class Meta:
            app_label = "testapp"
            indexes = [models.Index(fields=["owner", "bought"], name="toy_owner_bought")]

    assert check_model(Toy) == []


@isolate_apps("testapp")
def test_duplicate_and_prefix_duplicate_indexes() -> None:
    class Row(models.Model):
        a = models.IntegerField(db_index=True)
        b = models.IntegerField()
        c = models.IntegerField()
        d = models.IntegerField()

        class Meta:
            app_label = "testapp"
            unique_together = [("c", "d")]
            indexes = [
                models.Index(fields=["a"], name="row_a"),  # = db_index on a
                models.Index(fields=["b"], name="row_b"),  # prefix of row_b_c
                models.Index(fields=["b", "c"], name="row_b_c"),
                models.Index(fields=["c", "d"], name="row_c_d"),  # = unique_together
            ]

    messages = check_model(Row)
    assert _ids(messages) == ["django_scale.W406", "django_scale.W406", "django_scale.W407"]
    text = " ".join(m.msg for m in messages)
    assert "'row_a'" in text and "'row_c_d'" in text and "'row_b'" in text
    assert "unique_together" not in " ".join(m.hint for m in messages)  # the unique one is kept

    class Fk(models.Model):
        row = models.ForeignKey(Row, models.CASCADE)
        at = models.DateField()

        class Meta:
            app_label = "testapp"
            indexes = [models.Index(fields=["row", "at"], name="fk_row_at")]

    (message,) = check_model(Fk)
    assert message.id == "django_scale.W407"
    assert "db_index=False" in message.hint


@isolate_apps("testapp")
def test_admin_filter_ordering_and_date_hierarchy() -> None:
    class Issue(models.Model):
        status = models.CharField(max_length=10)
        opened = models.DateTimeField()
        title = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"
            ordering = ["-opened"]
            indexes = [models.Index(fields=["-opened"], name="issue_opened")]

    class IssueAdmin(ScaleModelAdmin):
        list_filter = ["status", "opened"]
        date_hierarchy = "opened"
        sortable_by: list[str] = []

    site = admin.AdminSite()
    ids = _ids(IssueAdmin(Issue, site).check())
    assert ids == ["django_scale.W306"]
    (message,) = IssueAdmin(Issue, site).check()
    assert message.obj is IssueAdmin
    assert "fields=['status', '-opened']" in message.hint

    class ServedIssue(models.Model):
        status = models.CharField(max_length=10)
        opened = models.DateTimeField()

        class Meta:
            app_label = "testapp"
            ordering = ["-opened"]
            indexes = [
                models.Index(fields=["-opened"], name="served_opened"),
                models.Index(fields=["status", "-opened"], name="served_status_opened"),
            ]

    assert IssueAdmin(ServedIssue, site).check() == []

    class OrderedAdmin(ScaleModelAdmin):
        ordering = ["title"]
        date_hierarchy = "opened"
        sortable_by: list[str] = []

    class Bare(models.Model):
        opened = models.DateTimeField()
        title = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    assert _ids(OrderedAdmin(Bare, site).check()) == ["django_scale.W305", "django_scale.W307"]


def test_serving_index_of_the_seeded_model() -> None:
    assert serving_index(Ticket, order=[("opened_at", True)]) is not None
    assert serving_index(Ticket, equal=["status"], order=[("opened_at", True)]) is None


# -- The advisor ---------------------------------------------------------------------------


def _hypopg_available() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg'")
        return cursor.fetchone() is not None


def _seed() -> None:
    available = _hypopg_available()
    with connection.cursor() as cursor:
        if available:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS hypopg")
        cursor.execute(
            "INSERT INTO testapp_ticket (status, kind, opened_at, title) "
            "SELECT CASE WHEN g % 50 = 0 THEN 'rare' ELSE 'open' END, "
            "CASE WHEN g % 10 = 0 THEN 'b' ELSE 'a' END, "
            "now() - g * interval '1 minute', 'ticket ' || g FROM generate_series(1, 100000) g"
        )
        cursor.execute("ANALYZE testapp_ticket")
        cursor.execute("SELECT pg_stat_statements_reset()")


@pytest.fixture
def seeded(transactional_db: None) -> Iterator[None]:
    _seed()
    slowlog.reset()
    yield
    slowlog.reset()
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'testapp_ticket'")
        for (name,) in cursor.fetchall():
            if name.startswith(("testapp_ticket_status", "testapp_ticket_kind")):
                cursor.execute(f'DROP INDEX IF EXISTS "{name}"')


def _run_workload() -> None:
    # On the primary, whose statements the advisor reads (the router would send reads to the replica).
    tickets = Ticket.objects.using("default")
    with slowlog.recording("default", threshold_ms=0):
        for _ in range(3):
            list(tickets.filter(status="rare").order_by("-opened_at")[:20])
            list(tickets.filter(kind="a").values_list("id", flat=True)[:5000])


@pytest.mark.hypopg
@pytest.mark.postgres
def test_advisor_proposes_the_filter_and_ordering_index_and_its_migration_applies(
    seeded: None, tmp_path: Path
) -> None:
    _run_workload()
    advice = advise("default", slow=slowlog.slow_queries())
    assert advice.proven and not advice.notes
    by_columns = {s.candidate.columns: s for s in advice.suggestions}
    assert (("status", False), ("opened_at", True)) in by_columns, advice
    suggestion = by_columns[(("status", False), ("opened_at", True))]
    assert suggestion.size_bytes > 0 and suggestion.live_rows > 0
    served = suggestion.statements
    assert {p.planning for p in served} == {"example"}  # planned with the real 'rare'
    assert all(p.cut >= 0.5 for p in served)
    # The low-selectivity filter (kind = 'a', 90 % of rows) gains nothing from an index.
    assert not any(c[0][0] == "kind" for c in by_columns)
    assert any("kind" in planned.sql for planned, _ in advice.rejected)

    # dexter's NULL parameters: "status = NULL" is never true, so no index looks useful.
    null_advice = advise("default", planning="null")
    assert (("status", False), ("opened_at", True)) not in {
        s.candidate.columns for s in null_advice.suggestions
    }

    path = write_migration("testapp", advice.suggestions, directory=str(tmp_path))
    assert path is not None
    text = path.read_text()
    assert "AddIndexConcurrently" in text and "atomic = False" in text
    spec = importlib.util.spec_from_file_location("scale_indexes_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    executor = MigrationExecutor(connection)
    state = executor.loader.project_state(module.Migration.dependencies[0])
    with connection.schema_editor(atomic=False) as editor:
        module.Migration(path.stem, "testapp").apply(state, editor)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'testapp_ticket' AND indexname LIKE 'testapp_ticket_status%%'"
        )
        (definition,) = cursor.fetchone()
    assert "(status, opened_at DESC)" in definition
    # Once the index exists, the same query plans with it and the advisor proposes it no more.
    assert (("status", False), ("opened_at", True)) not in {
        s.candidate.columns for s in advise("default", slow=slowlog.slow_queries()).suggestions
    }


@pytest.mark.hypopg
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_scale_indexes_command_and_verify(seeded: None) -> None:
    _run_workload()
    out = io.StringIO()
    err = io.StringIO()
    call_command("scale_indexes", stdout=out, stderr=err)
    text = out.getvalue()
    assert 'CREATE INDEX ON "testapp_ticket" ("status", "opened_at" DESC)' in text
    assert "testapp.Ticket.Meta.indexes: models.Index(fields=['status', '-opened_at']" in text
    assert "Unused indexes (scans summed over default, replica)" in text
    out = io.StringIO()
    call_command("scale_indexes", "--verify", stdout=out)
    assert "mean before" in out.getvalue()


def _scans(alias: str, name: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", [name])
        row = cursor.fetchone()
        return int(row[0]) if row else -1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_an_index_used_only_on_the_replica_is_not_unused(seeded: None, replica: Any) -> None:
    with connection.cursor() as cursor:
        cursor.execute("CREATE INDEX testapp_ticket_kind_probe ON testapp_ticket (kind)")
    replica.wait_for_replay()
    names = {index.name for index in unused_indexes(["default", "replica"])}
    assert "testapp_ticket_kind_probe" in names
    with connections["replica"].cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        cursor.execute("SELECT count(*) FROM testapp_ticket WHERE kind = 'b'")
        cursor.fetchone()
    connections["replica"].close()  # a backend's statistics are flushed when it ends, at the latest
    deadline = time.monotonic() + 20
    while _scans("replica", "testapp_ticket_kind_probe") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _scans("default", "testapp_ticket_kind_probe") == 0
    assert _scans("replica", "testapp_ticket_kind_probe") >= 1
    assert "testapp_ticket_kind_probe" not in {i.name for i in unused_indexes(["default", "replica"])}
    # Judged on the primary alone, it would have been dropped.
    assert "testapp_ticket_kind_probe" in {i.name for i in unused_indexes(["default"])}


@pytest.mark.postgres
def test_duplicate_indexes_in_the_database(seeded: None) -> None:
    with connection.cursor() as cursor:
        cursor.execute("CREATE INDEX testapp_ticket_kind_a ON testapp_ticket (kind)")
        cursor.execute("CREATE INDEX testapp_ticket_kind_b ON testapp_ticket (kind, opened_at)")
    found = {(d.name, d.covered_by) for d in duplicate_indexes("default")}
    assert ("testapp_ticket_kind_a", "testapp_ticket_kind_b") in found
    assert not any(name == "testapp_ticket_kind_b" for name, _ in found)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_without_hypopg_and_pg_stat_statements_it_says_what_to_install(seeded: None) -> None:
    _run_workload()
    slow = slowlog.slow_queries()
    with connection.cursor() as cursor:
        cursor.execute("DROP EXTENSION IF EXISTS hypopg")
        cursor.execute("DROP EXTENSION pg_stat_statements")
    try:
        advice = advise("default", slow=slow)
        assert not advice.proven
        notes = " ".join(advice.notes)
        assert "CREATE EXTENSION hypopg" in notes
        assert "CREATE EXTENSION pg_stat_statements" in notes
        # It still does what it can: the slow-query log's statements give unproven candidates.
        assert (("status", False), ("opened_at", True)) in {s.candidate.columns for s in advice.suggestions}
        assert write_migration("testapp", []) is None
        out, err = io.StringIO(), io.StringIO()
        call_command("scale_indexes", "--database", "default", stdout=out, stderr=err)
        assert "Candidate indexes (unproven: no HypoPG)" in out.getvalue()
        assert "CREATE EXTENSION hypopg" in err.getvalue()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if _hypopg_available():
            with connection.cursor() as cursor:
                cursor.execute("CREATE EXTENSION IF NOT EXISTS hypopg")


@pytest.mark.hypopg
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_statements_the_replica_ran_are_advised_too(seeded: None, replica: Any) -> None:
    replica.wait_for_replay()
    with connections["replica"].cursor() as cursor:
        cursor.execute("SELECT pg_stat_statements_reset()")
    for _ in range(3):
        list(Ticket.objects.using("replica").filter(kind="b", status="rare").order_by("opened_at")[:7])
    primary_only = advise("default")
    both = advise("default", statements_from=["replica"])

    def planned(advice: Any) -> list[str]:
        return [p.sql for s in advice.suggestions for p in s.statements] + [p.sql for p, _ in advice.rejected]

    assert not any('"kind" = $' in sql for sql in planned(primary_only))
    assert any('"kind" = $' in sql and '"status" = $' in sql for sql in planned(both))
