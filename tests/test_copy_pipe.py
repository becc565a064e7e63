"""The COPY pipe between databases (issue 19), and ``iter_batches`` over values()/values_list().

The pipe runs from the ``legacy`` alias (a second database on the primary's server) to
``default``, with the driver under test (psycopg2, or psycopg 3 in the ``-psycopg3`` env). On
SQLite the same calls go through the documented fallback (``values_list()`` + ``copy_from``).
"""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections, transaction
from django.db.models import CharField, F, IntegerField, Value
from django.db.models.functions import Cast, Concat, Upper
from django.test.utils import CaptureQueriesContext
from test_bulk import FIELDS, expected, sample, snapshot

from django_scale.bulk import copy_between, copy_from, iter_batches, plan_copy
from django_scale.bulk.batches import selected_names
from django_scale.contrib.backfill.models import BackfillCheckpoint
from django_scale.exceptions import ArgumentError, BulkDataError, BulkError

import harness
from testapp.models import (
    AddressRecord,
    Author,
    BulkRecord,
    NewCharacter,
    NewPublisher,
    OldCharacter,
    OldPublisher,
    PostgresBulkRecord,
)

POSTGRES = harness.BACKEND != "sqlite"
BOTH = pytest.mark.django_db(databases=["default", "legacy"])
BOTH_COMMITTED = pytest.mark.django_db(transaction=True, databases=["default", "legacy"])
#: COPY between two PostgreSQL databases: deselected on the embedded default (SQLite takes the
#: fallback, tested by the other tests), never skipped.
PG_ONLY = pytest.mark.postgres


def legacy_characters(n: int, publishers: int = 3, name: Any = None) -> None:
    OldPublisher.objects.using("legacy").bulk_create(
        [OldPublisher(id=100 + p, name=f"publisher {p}") for p in range(publishers)]
    )
    OldCharacter.objects.using("legacy").bulk_create(
        [
            OldCharacter(id=i, publisher_id=100 + i % publishers, name=name(i) if name else f"hero {i}")
            for i in range(1, n + 1)
        ]
    )


SEED = {
    "nickname": F("name"),
    "secret_identity": Value("Clark Kent"),
}


# -- iter_batches over values() / values_list() -------------------------------------------


@pytest.mark.django_db
def test_selected_names_match_the_rows():
    """selected_names() mirrors Django's ValuesIterable: the order of each row's columns."""
    copy_from(BulkRecord, [("a", 1)], fields=["name", "count"])
    shapes = [
        BulkRecord.objects.values("count", "name"),
        BulkRecord.objects.values("name", twice=F("count") * 2),
        BulkRecord.objects.annotate(up=Upper("name")).values("up", "count"),
        BulkRecord.objects.values("count", shout=Upper("name")).values("shout", "count"),
    ]
    for queryset in shapes:
        row = queryset.get()
        assert selected_names(queryset) == list(row)
        as_tuples = queryset.values_list(*selected_names(queryset))
        assert as_tuples.get() == tuple(row.values())


@pytest.mark.django_db
def test_iter_batches_over_values_list_values_and_flat():
    copy_from(BulkRecord, [(f"v-{n:04d}", n) for n in range(250)], fields=["name", "count"])
    tuples = list(iter_batches(BulkRecord.objects.values_list("name", "pk", "count"), 100))
    assert [len(batch) for batch in tuples] == [100, 100, 50]
    assert all(isinstance(row, tuple) and len(row) == 3 for batch in tuples for row in batch)
    assert [row[0] for batch in tuples for row in batch] == [f"v-{n:04d}" for n in range(250)]
    dicts = list(iter_batches(BulkRecord.objects.values("id", doubled=F("count") * 2), 64))
    assert [row["doubled"] for batch in dicts for row in batch] == [2 * n for n in range(250)]
    flat = [pk for batch in iter_batches(BulkRecord.objects.values_list("pk", flat=True), 99) for pk in batch]
    assert flat == sorted(BulkRecord.objects.values_list("pk", flat=True))
    named = next(iter_batches(BulkRecord.objects.values_list("id", "name", named=True), 5))
    assert [row.name for row in named] == [f"v-{n:04d}" for n in range(5)]
    # By another unique key, read from the tuple.
    by_name = list(iter_batches(BulkRecord.objects.values_list("count", "name"), 100, key="name"))
    assert [row[0] for batch in by_name for row in batch] == list(range(250))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (lambda qs: qs.values_list("name", "count"), r"values_list\('name', 'count'\) needs the key"),
        (lambda qs: qs.values_list("name", flat=True), r"flat=True\) needs the flat column to be the key"),
        (lambda qs: qs.values("name"), r"values\('name'\) needs the key"),
        (lambda qs: qs.all()[:10], "sliced queryset"),
        (lambda qs: qs.union(qs), r"union\(\) queryset"),
    ],
)
def test_iter_batches_refuses_shapes_it_cannot_batch(shape, message):
    copy_from(BulkRecord, [("only", 1)], fields=["name", "count"])
    with pytest.raises(ArgumentError, match=message) as caught:
        next(iter_batches(shape(BulkRecord.objects.all()), 10))
    assert isinstance(caught.value, ValueError)


@pytest.mark.postgres  # DISTINCT ON is PostgreSQL's
@pytest.mark.django_db
def test_iter_batches_refuses_distinct_on():
    with pytest.raises(ArgumentError, match=r"distinct\(name\)"):
        next(iter_batches(BulkRecord.objects.distinct("name"), 10))


@pytest.mark.django_db(transaction=True)
def test_values_list_batches_exactly_once_under_concurrent_writes():
    copy_from(BulkRecord, [(f"c-{n:04d}", n) for n in range(600)], fields=["name", "count"])
    original = set(BulkRecord.objects.values_list("pk", flat=True))
    seen: list[int] = []
    deleted: set[int] = set()
    for number, batch in enumerate(iter_batches(BulkRecord.objects.values_list("count", "pk"), 41)):
        seen.extend(pk for _count, pk in batch)
        last = batch[-1][1]

        # Another connection (a thread, on PostgreSQL) deletes a row ahead, inserts rows, updates rows ahead.
        def write(number: int = number, last: int = last) -> None:
            try:
                ahead = list(
                    BulkRecord.objects.filter(pk__gt=last).order_by("pk").values_list("pk", flat=True)[:3]
                )
                BulkRecord.objects.filter(pk__in=ahead[:1]).delete()
                deleted.update(ahead[:1])
                BulkRecord.objects.filter(pk__in=ahead[1:]).update(count=-number)
                if number < 4:
                    copy_from(
                        BulkRecord, [(f"n-{number}-{n}", 0) for n in range(3)], fields=["name", "count"]
                    )
            finally:
                if POSTGRES:
                    connections.close_all()

        if POSTGRES:
            writer = threading.Thread(target=write)
            writer.start()
            writer.join()
        else:
            # SQLite's in-memory test database: one connection (another thread's would leak).
            write()
    assert len(seen) == len(set(seen)), "a row was seen twice"
    assert original - deleted <= set(seen), "a row that existed throughout was skipped"
    assert not set(seen) & deleted


# -- The pipe: round trips ----------------------------------------------------------------


@BOTH
def test_every_field_type_round_trips_through_the_pipe():
    for alias in ("legacy", "default"):
        Author.objects.using(alias).create(id=7, name="Writer")
    author = Author.objects.using("legacy").get()
    rows = [sample(n, author) for n in range(1, 41)]
    copy_from(BulkRecord, rows, fields=FIELDS, using="legacy")
    source = BulkRecord.objects.using("legacy")
    with CaptureQueriesContext(connections["default"]) as queries:
        assert copy_between(source.all(), BulkRecord, using="default") == 40
    assert snapshot() == expected(rows)
    if POSTGRES:
        # One COPY on the target, binary; no INSERT.
        copies = [q["sql"] for q in queries if q["sql"].startswith("COPY")]
        assert not any(q["sql"].startswith("INSERT") for q in queries)
        assert copies == [] or all("BINARY" in sql for sql in copies)
    # Ids are kept; so are auto_now_add values on PostgreSQL (the fallback's bulk_create sets
    # them anew, as Django does on insert).
    shown = ["pk", "created"] if POSTGRES else ["pk"]
    assert list(source.order_by("pk").values_list(*shown)) == list(
        BulkRecord.objects.order_by("pk").values_list(*shown)
    )
    # The id sequence moved past the copied ids: a new row does not collide.
    BulkRecord.objects.create(name="after")


@PG_ONLY
@BOTH
def test_postgresql_arrays_json_and_inet_round_trip():
    rows = [
        PostgresBulkRecord(
            tags=["a", 'q"uote', "back\\slash", "", "tab\t"],
            grid=[[1, None], [3, 4]],
            stamps=None,
            data={"k": [1, {"x": None}]},
        ),
        PostgresBulkRecord(tags=[], grid=None, stamps=[], data=[]),
    ]
    PostgresBulkRecord.objects.using("legacy").bulk_create(rows)
    assert copy_between(PostgresBulkRecord.objects.using("legacy").all(), PostgresBulkRecord) == 2
    got = list(PostgresBulkRecord.objects.order_by("pk").values_list("tags", "grid", "stamps", "data"))
    want = list(
        PostgresBulkRecord.objects.using("legacy")
        .order_by("pk")
        .values_list("tags", "grid", "stamps", "data")
    )
    assert got == want
    # A type outside the per-type table (inet), in binary as well.
    AddressRecord.objects.using("legacy").bulk_create(
        [
            AddressRecord(name="v4", address="10.1.2.3"),
            AddressRecord(name="v6", address="2001:db8::1"),
            AddressRecord(name="none"),
        ]
    )
    assert copy_between(AddressRecord.objects.using("legacy").all(), AddressRecord) == 3
    assert list(AddressRecord.objects.order_by("pk").values_list("name", "address")) == [
        ("v4", "10.1.2.3"), ("v6", "2001:db8::1"), ("none", None),
    ]  # fmt: skip


@BOTH
def test_the_seeds_migration_is_one_call_with_transforms():
    legacy_characters(30)
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    source = OldCharacter.objects.using("legacy").values(
        "id",
        "publisher_id",
        nickname=Upper("name"),
        secret_identity=Concat(Value("Clark "), Value("Kent"), output_field=CharField()),
        power=Cast(F("id") * 10, IntegerField()),
    )
    assert copy_between(source, NewCharacter, batch_size=7) == 30
    got = {c.id: c for c in NewCharacter.objects.all()}
    assert len(got) == 30
    assert got[12].nickname == "HERO 12" and got[12].secret_identity == "Clark Kent" and got[12].power == 120
    assert got[12].publisher_id == 100 and got[13].publisher_id == 101


@BOTH
def test_target_defaults_fill_fields_the_source_does_not_give():
    legacy_characters(5)
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    copy_between(OldCharacter.objects.using("legacy").values("id", "publisher", **SEED), NewCharacter)
    assert set(NewCharacter.objects.values_list("power", flat=True)) == {1}


# -- Types checked before any row moves ----------------------------------------------------


@BOTH
def test_a_column_of_the_wrong_type_is_refused_naming_the_field_before_any_row():
    legacy_characters(5)
    source = OldCharacter.objects.using("legacy").values(
        "id", "publisher_id", nickname=F("id"), secret_identity=Value("x")
    )
    with (
        CaptureQueriesContext(connections["default"]) as queries,
        pytest.raises(
            BulkError, match=r"NewCharacter.nickname is varchar\(50\).*'nickname' is integer.*Cast"
        ),
    ):
        copy_between(source, NewCharacter)
    assert not [q for q in queries if "COPY" in q["sql"] or "INSERT" in q["sql"]]
    assert NewCharacter.objects.count() == 0
    with pytest.raises(BulkError, match=r"'alias' is not a field of NewCharacter"):
        copy_between(OldCharacter.objects.using("legacy").values("id", alias=F("name")), NewCharacter)


@PG_ONLY
@BOTH
def test_a_value_too_long_is_refused_not_truncated_naming_row_and_field():
    legacy_characters(12, name=lambda i: "x" * 60 if i == 9 else f"hero {i}")
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    source = OldCharacter.objects.using("legacy").values("id", "publisher_id", **SEED)
    with pytest.raises(BulkDataError, match="too long") as caught:
        copy_between(source, NewCharacter, batch_size=5)
    assert caught.value.row == 9 and caught.value.field == "nickname"
    # Batch 1 (ids 1-5) committed; batch 2 (6-10) rolled back whole.
    assert sorted(NewCharacter.objects.values_list("id", flat=True)) == [1, 2, 3, 4, 5]


# -- Failure mid-way, resume ---------------------------------------------------------------


@BOTH_COMMITTED
def test_a_failure_midway_leaves_the_target_consistent_and_resumable():
    legacy_characters(50)
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    # A row already at the target with id 23: its batch (21-30) fails on the primary key.
    NewCharacter.objects.create(id=23, publisher_id=100, nickname="squatter", secret_identity="?")
    source = OldCharacter.objects.using("legacy").values("id", "publisher_id", **SEED)
    seen: list[int] = []
    with pytest.raises(BulkError):
        copy_between(
            source, NewCharacter, batch_size=10, resume="seed", progress=lambda p: seen.append(p.rows_done)
        )
    assert seen == [10, 20]
    # The target holds whole batches only, and the checkpoint says which.
    assert sorted(NewCharacter.objects.values_list("id", flat=True)) == [*range(1, 21), 23]
    checkpoint = BackfillCheckpoint.objects.get(name="seed")
    assert (checkpoint.last_key, checkpoint.rows_done, checkpoint.finished_at) == (20, 20, None)
    # Fixed at the target, the run resumes after the last committed batch: no row twice.
    NewCharacter.objects.filter(id=23).delete()
    with CaptureQueriesContext(connections["legacy"]) as queries:
        assert copy_between(source, NewCharacter, batch_size=10, resume="seed") == 30
    assert not any('"id" <= 10' in q["sql"] or '"id" > 10 ' in q["sql"] for q in queries)
    assert sorted(NewCharacter.objects.values_list("id", flat=True)) == list(range(1, 51))
    checkpoint.refresh_from_db()
    assert checkpoint.rows_done == 50 and checkpoint.finished_at is not None
    # Finished: a third run copies nothing.
    assert copy_between(source, NewCharacter, batch_size=10, resume="seed") == 0
    assert NewCharacter.objects.count() == 50


@PG_ONLY
@BOTH_COMMITTED
def test_a_source_failing_mid_stream_writes_nothing_of_its_batch():
    """The source's COPY fails after rows went out: the target must not commit the rows before it."""
    legacy_characters(3000)
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    # Division by zero at id 2500, after 2,499 rows (more than a 64 KB block) of the one COPY
    # have streamed out and reached the target.
    source = (
        OldCharacter.objects.using("legacy")
        .order_by()
        .values("id", "publisher_id", **SEED, power=Value(1000) / (F("id") - 2500))
    )
    with pytest.raises(Exception, match="division by zero"):
        copy_between(source, NewCharacter)
    assert NewCharacter.objects.count() == 0
    # Both connections are usable afterwards.
    assert OldCharacter.objects.using("legacy").count() == 3000
    assert copy_between(source.filter(id__lt=2500), NewCharacter) == 2499


@PG_ONLY
@BOTH_COMMITTED
def test_the_target_refusing_early_in_a_long_stream_stops_both_sides():
    """A bad row near the start of a 100,000-row COPY: an error naming it, nothing written, and
    both connections usable (the source's COPY cancelled or read to its end, not left open)."""
    legacy_characters(100_000, name=lambda i: "x" * 60 if i == 5 else f"hero {i}")
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    source = OldCharacter.objects.using("legacy").values("id", "publisher_id", **SEED)
    with pytest.raises(BulkDataError, match="too long") as caught:
        copy_between(source, NewCharacter)
    assert caught.value.field == "nickname"
    assert NewCharacter.objects.count() == 0
    assert OldCharacter.objects.using("legacy").filter(id__lte=10).count() == 10
    OldCharacter.objects.using("legacy").filter(id=5).update(name="hero 5")
    assert copy_between(source, NewCharacter) == 100_000


@BOTH
def test_resume_needs_batches():
    with pytest.raises(BulkError, match="resume= needs batch_size="):
        copy_between(
            OldCharacter.objects.using("legacy").values("id", "publisher_id", **SEED),
            NewCharacter,
            resume="x",
        )


# -- Upsert, FK remapping ------------------------------------------------------------------


@BOTH
def test_upsert_updates_rows_that_exist():
    legacy_characters(10)
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    source = OldCharacter.objects.using("legacy").values("id", "publisher_id", **SEED)
    copy_between(source.filter(id__lte=6), NewCharacter)
    OldCharacter.objects.using("legacy").filter(id=3).update(name="renamed")
    assert copy_between(source, NewCharacter, unique_fields=["id"], batch_size=4) == 10
    assert NewCharacter.objects.count() == 10
    assert NewCharacter.objects.get(id=3).nickname == "renamed"


@PG_ONLY
@BOTH
def test_foreign_keys_remapped_when_parents_get_new_keys():
    legacy_characters(20, publishers=4)
    # Some publisher already exists on the target: the parents get new, different keys.
    NewPublisher.objects.create(name="already here")
    parents = OldPublisher.objects.using("legacy").values("name", legacy_id=F("id"))
    assert copy_between(parents, NewPublisher) == 4
    new_key = dict(NewPublisher.objects.filter(legacy_id__isnull=False).values_list("legacy_id", "id"))
    assert all(new != old for old, new in new_key.items())
    source = OldCharacter.objects.using("legacy").values("id", "publisher_id", **SEED)
    assert copy_between(source, NewCharacter, remap={"publisher": "legacy_id"}, batch_size=6) == 20
    for character in NewCharacter.objects.all():
        old = OldCharacter.objects.using("legacy").get(id=character.id)
        assert character.publisher_id == new_key[old.publisher_id]
    # A key without its parent on the target is refused, naming the field, not dropped.
    OldPublisher.objects.using("legacy").create(id=999, name="orphans")
    OldCharacter.objects.using("legacy").create(id=500, publisher_id=999, name="lost")
    with pytest.raises(BulkDataError, match="publisher"):
        copy_between(source.filter(id=500), NewCharacter, remap={"publisher": "legacy_id"})
    assert not NewCharacter.objects.filter(id=500).exists()


# -- manage.py scale_copy ------------------------------------------------------------------


@PG_ONLY
@BOTH
def test_scale_copy_dry_run_prints_the_sql_and_copies_nothing():
    legacy_characters(3)
    out = io.StringIO()
    call_command(
        "scale_copy", "testapp.OldCharacter", "--from", "legacy", "--to", "default", "--dry-run", stdout=out
    )
    text = out.getvalue()
    assert "COPY (SELECT" in text and "TO STDOUT (FORMAT BINARY)" in text
    assert 'COPY "testapp_oldcharacter" ("id", "publisher_id", "name") FROM STDIN (FORMAT BINARY)' in text
    assert OldCharacter.objects.count() == 0


@BOTH
def test_scale_copy_copies_a_model_or_a_table_with_progress():
    legacy_characters(25)
    err = io.StringIO()
    call_command("scale_copy", "testapp_oldpublisher", "--from", "legacy", stdout=io.StringIO(), stderr=err)
    call_command(
        "scale_copy", "testapp.OldCharacter", "--from", "legacy", "--to", "default", "--batch-size", "10",
        stdout=io.StringIO(), stderr=err,
    )  # fmt: skip
    assert OldCharacter.objects.count() == 25 and OldPublisher.objects.count() == 3
    assert "25/25" in err.getvalue()


@BOTH
def test_scale_copy_from_a_queryset_path_into_another_model():
    legacy_characters(8)
    for publisher in OldPublisher.objects.using("legacy").all():
        NewPublisher.objects.create(id=publisher.id, name=publisher.name)
    out = io.StringIO()
    call_command(
        "scale_copy", "test_copy_pipe.seed_queryset", "--into", "testapp.NewCharacter", "--from", "legacy",
        "--batch-size", "3", "--resume", "cmd", stdout=out, stderr=io.StringIO(),
    )  # fmt: skip
    assert NewCharacter.objects.count() == 8
    assert "8 rows" in out.getvalue()


def seed_queryset() -> Any:
    return OldCharacter.objects.values("id", "publisher_id", **SEED)


@BOTH
def test_plan_names_every_target_field_once():
    with pytest.raises(BulkError, match="both fill NewCharacter.publisher"):
        plan_copy(
            OldCharacter.objects.using("legacy").values("id", "publisher", "publisher_id", **SEED),
            NewCharacter,
        )
    with transaction.atomic(using="default"):
        plan = plan_copy(OldCharacter.objects.using("legacy").values("id", "publisher", **SEED), NewCharacter)
    assert [field.name for field in plan.fields] == [
        "id",
        "publisher",
        "nickname",
        "secret_identity",
        "power",
    ]


@BOTH
def test_scale_copy_upserts_and_names_bad_arguments():
    from django.core.management.base import CommandError

    legacy_characters(6)
    call_command(
        "scale_copy", "testapp.OldPublisher", "--from", "legacy", stdout=io.StringIO(), stderr=io.StringIO()
    )
    call_command(
        "scale_copy", "testapp.OldCharacter", "--from", "legacy", stdout=io.StringIO(), stderr=io.StringIO()
    )
    OldCharacter.objects.using("legacy").filter(id=2).update(name="changed")
    call_command(
        "scale_copy", "testapp.OldCharacter", "--from", "legacy", "--upsert", "id",
        stdout=io.StringIO(), stderr=io.StringIO(),
    )  # fmt: skip
    assert OldCharacter.objects.count() == 6 and OldCharacter.objects.get(id=2).name == "changed"
    with pytest.raises(CommandError, match="No database alias 'nowhere'"):
        call_command("scale_copy", "testapp.OldCharacter", "--from", "nowhere")
    with pytest.raises(CommandError, match="not app_label.Model, a table of an installed model"):
        call_command("scale_copy", "no_such_table", "--from", "legacy")
    with pytest.raises(
        CommandError, match="NewCharacter fields nickname, secret_identity are NOT NULL without a default"
    ):
        call_command(
            "scale_copy", "testapp.OldCharacter", "--into", "testapp.NewCharacter", "--from", "legacy"
        )


# -- A source standby that hangs ----------------------------------------------------------


@PG_ONLY
@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_a_source_replica_that_hangs_mid_stream_is_cut_off_and_the_target_keeps_nothing(replica):
    """A standby that stops answering in the middle of a COPY: the pipe fails, it does not wait for ever.

    The replica guard's watchdog watches a COPY whose source is one of REPLICAS (a COPY goes
    through no execute wrapper): once the monitor finds the frozen standby unresponsive, the
    source connection is cut off, both COPY statements end with an error, and the target's
    transaction leaves nothing behind.
    """
    import time
    from contextlib import closing

    from support import wait_until

    from django_scale.replicas import monitor
    from django_scale.replicas.guard import watchdog
    from django_scale.testing import override_scale_settings

    control = harness.services().replica_control
    if control is None:
        pytest.skip("the replica is an external server; only a harness-started one can be frozen")
    # Far more than the socket buffers hold: frozen at the first rows, the source has sent
    # only a small part of its stream, and the rest never comes.
    rows = 2_000_000
    with connections["default"].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {OldPublisher._meta.db_table} (id, name) "
            "SELECT g, 'publisher ' || g FROM generate_series(1, %s) g",
            [rows],
        )
    replica.wait_for_replay()
    wait_until(lambda: monitor("replica").is_available(), "the replica in rotation")
    source = OldPublisher.objects.using("replica").annotate(legacy_id=F("id")).values("name", "legacy_id")
    frozen = threading.Event()

    def freeze_once_rows_flow() -> None:
        # The target's COPY FROM has taken rows: the stream is under way. Freeze the source.
        primary = connections["default"]
        watcher = primary.get_new_connection(primary.get_connection_params())
        try:
            watcher.autocommit = True
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with closing(watcher.cursor()) as cursor:
                    cursor.execute(
                        "SELECT coalesce(max(tuples_processed), 0) FROM pg_stat_progress_copy "
                        "WHERE command = 'COPY FROM'"
                    )
                    if cursor.fetchone()[0] > 0:
                        control.freeze()
                        frozen.set()
                        return
                time.sleep(0.005)
        finally:
            watcher.close()

    cut_before = watchdog.cut_off
    thread = threading.Thread(target=freeze_once_rows_flow, daemon=True)
    try:
        with override_scale_settings(REPLICA_DEADLINE=1.0):
            thread.start()
            started = time.monotonic()
            # The target ends its COPY with the source's error: nothing of the batch is written.
            with pytest.raises(BulkError, match="Nothing of its batch was written"):
                copy_between(source, NewPublisher, using="default")
            took = time.monotonic() - started
            thread.join(60)
    finally:
        control.thaw()
        connections["replica"].close()
        monitor("replica").forget_ejection()
    assert frozen.is_set(), "the COPY finished before the source could be frozen: copy more rows"
    assert watchdog.cut_off == cut_before + 1
    assert took < 30
    assert NewPublisher.objects.count() == 0
    wait_until(lambda: monitor("replica").is_available(), "the replica back in rotation")
