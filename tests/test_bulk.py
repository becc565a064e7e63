"""COPY in, out, upsert and update; keyset batches.

The COPY paths run on the real PostgreSQL primary (with the driver under test: psycopg2, or
psycopg 3 in the ``-psycopg3`` tox env); the same calls run on SQLite through the documented
``bulk_create`` / ``bulk_update`` fallback.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import re
import time
import uuid
import zoneinfo
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from django_scale.bulk import copy_from, copy_to, copy_update, copy_upsert, iter_batches
from django_scale.bulk.rows import _Columns
from django_scale.exceptions import BulkDataError, BulkError

import harness
from testapp.models import AddressRecord, Author, BulkRecord, PostgresBulkRecord

POSTGRES = harness.BACKEND != "sqlite"
ONLY_POSTGRES = pytest.mark.postgres
TESTS = Path(__file__).resolve().parent
PARIS = zoneinfo.ZoneInfo("Europe/Paris")

FIELDS = [
    "name",
    "note",
    "count",
    "big",
    "amount",
    "ratio",
    "flag",
    "day",
    "at",
    "clock",
    "span",
    "uid",
    "data",
    "blob",
    "author",
]


def sample(n: int, author: Author | None) -> dict[str, Any]:
    """Row *n*: every type, with the awkward values (NULL vs "", escapes, unicode, 0 bytes)."""
    return {
        "name": f"row-{n}",
        "note": [None, "", "tab\there", "new\nline\r\\back\\slash", "ünï ☃ 'quote' \"dq\""][n % 5],
        "count": n - 2,
        "big": None if n % 3 == 0 else 2**62 + n,
        "amount": None if n % 4 == 0 else decimal.Decimal(f"{n}.{n % 100:02d}"),
        "ratio": None if n % 6 == 0 else n / 7,
        "flag": n % 2 == 0,
        "day": datetime.date(2024, 2, 29) + datetime.timedelta(days=n),
        "at": None if n % 5 == 1 else datetime.datetime(2024, 3, 31, 1, 30, n % 60, 123456, tzinfo=PARIS),
        "clock": datetime.time(23, 59, n % 60, 5),
        "span": datetime.timedelta(days=n, seconds=7, microseconds=9),
        "uid": uuid.UUID(int=n),
        "data": [None, {"a": [1, 2.5, "x\ty"], "b": {"c": None}}, [], "text", 0][n % 5],
        "blob": None if n % 7 == 0 else bytes([0, 92, 9, 10, 255, n % 256]),
        "author": author,
    }


def snapshot(names: list[str] | None = None) -> list[dict[str, Any]]:
    rows = BulkRecord.objects.order_by("name")
    if names is not None:
        rows = rows.filter(name__in=names)
    out = []
    for row in rows:
        values = {field: getattr(row, field) for field in FIELDS}
        values["blob"] = None if row.blob is None else bytes(row.blob)
        out.append(values)
    return out


def expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: row["name"])


@pytest.fixture
def author(db: None) -> Author:
    return Author.objects.create(name="Writer")


# -- copy_from: every field type, three kinds of rows ------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["instances", "tuples", "dicts"])
def test_copy_from_round_trips_every_field_type(kind, author):
    rows = [sample(n, author) for n in range(1, 31)]
    if kind == "instances":
        payload: list[Any] = [BulkRecord(**row) for row in rows]
        written = copy_from(BulkRecord, payload)
    elif kind == "tuples":
        payload = [tuple(row[field] if field != "author" else author.pk for field in FIELDS) for row in rows]
        fields = [*FIELDS[:-1], "author_id"]
        written = copy_from(BulkRecord, payload, fields=fields)
    else:
        written = copy_from(BulkRecord, rows, fields=FIELDS)
    assert written == 30
    assert snapshot() == expected(rows)
    # NULL and "" stay apart.
    notes = Counter(BulkRecord.objects.values_list("note", flat=True))
    assert notes[None] == 6 and notes[""] == 6
    # auto_now_add is filled for instances (pre_save), as bulk_create does.
    if kind == "instances":
        assert BulkRecord.objects.filter(created__isnull=True).count() == 0


@pytest.mark.django_db
def test_copy_from_dicts_take_field_defaults_for_missing_keys():
    assert (
        copy_from(BulkRecord, [{"name": "a"}, {"name": "b", "count": 5}], fields=["name", "count", "flag"])
        == 2
    )
    assert list(BulkRecord.objects.order_by("name").values_list("name", "count", "flag")) == [
        ("a", 0, False),
        ("b", 5, False),
    ]


@pytest.mark.django_db
def test_copy_from_accepts_a_generator_in_batches():
    rows = ((f"g-{n}", n) for n in range(2500))
    assert copy_from(BulkRecord, rows, fields=["name", "count"], batch_size=1000) == 2500
    assert BulkRecord.objects.count() == 2500


@ONLY_POSTGRES
@pytest.mark.django_db
def test_copy_from_round_trips_postgresql_arrays_and_json():
    at = datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    rows = [
        {"tags": [], "grid": None, "stamps": None, "data": {}},
        {
            "tags": ['a "quoted", {braced}', "back\\slash", "tab\tand\nnewline", "NULL", "", "ü"],
            "grid": [[1, None], [3, 4]],
            "stamps": [at, at + datetime.timedelta(days=1)],
            "data": [1, {"k": "v"}, None],
        },
    ]
    assert copy_from(PostgresBulkRecord, rows) == 2
    got = [
        {"tags": r.tags, "grid": r.grid, "stamps": r.stamps, "data": r.data}
        for r in PostgresBulkRecord.objects.order_by("pk")
    ]
    assert got == rows


@pytest.mark.django_db
def test_copy_from_sends_other_field_types_as_django_would():
    # An inet has no binary path here: with psycopg 3 the COPY goes as text, parsed by the server.
    rows = [("a", "192.0.2.1"), ("b", "2001:db8::1"), ("c", None)]
    assert copy_from(AddressRecord, rows, fields=["name", "address"]) == 3
    assert list(AddressRecord.objects.order_by("name").values_list("name", "address")) == rows


@ONLY_POSTGRES
@pytest.mark.django_db
def test_copy_from_is_one_copy_statement():
    with CaptureQueriesContext(connection) as queries:
        copy_from(BulkRecord, [(f"q-{n}", n) for n in range(100)], fields=["name", "count"])
    # COPY goes straight to the driver; Django logs only the savepoint around it.
    assert [q["sql"] for q in queries if "COPY" in q["sql"] or "INSERT" in q["sql"]] == []
    assert BulkRecord.objects.count() == 100


# -- Bad data: the row's number, nothing of its batch ------------------------------------


@pytest.mark.django_db(transaction=True)
def test_too_long_value_names_its_row_and_commits_nothing_of_its_batch():
    rows = [(f"ok-{n}", n) for n in range(1, 11)]
    rows[6] = ("x" * 21, 7)  # row 7: longer than max_length=20, never truncated
    if POSTGRES:
        with pytest.raises(BulkDataError) as raised:
            copy_from(BulkRecord, rows, fields=["name", "count"])
        assert raised.value.row == 7 and raised.value.field == "name"
        assert "Row 7" in str(raised.value) and "too long" in str(raised.value)
        assert BulkRecord.objects.count() == 0
        with pytest.raises(BulkDataError) as raised:
            copy_from(BulkRecord, rows, fields=["name", "count"], batch_size=5)
        assert raised.value.row == 7
        # The first batch (rows 1-5) committed; the second (6-10) not at all.
        assert sorted(BulkRecord.objects.values_list("count", flat=True)) == [1, 2, 3, 4, 5]
    else:
        # SQLite does not enforce max_length: there is nothing to refuse.
        assert copy_from(BulkRecord, rows, fields=["name", "count"]) == 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("bad", "message", "field"),
    [
        # PostgreSQL refuses the NULL (COPY's line number gives the row); the fallback checks it.
        (
            ("n-3", None),
            'Row 3: null value in column "count"'
            if POSTGRES
            else "Row 3 has None for 'count', which is NOT NULL",
            "count",
        ),
        # Found in Python, before anything is sent: on every database.
        (("n-3",), "Row 3 has 1 values for 2 fields (name, count)", None),
        (("n-3", 1.5j), "Row 3 has a bad value for 'count'", "count"),
    ],
)
def test_malformed_row_reports_its_number(bad, message, field):
    rows: list[tuple[Any, ...]] = [("n-1", 1), ("n-2", 2), bad, ("n-4", 4)]
    with pytest.raises(BulkDataError, match=re.escape(message)) as raised:
        copy_from(BulkRecord, rows, fields=["name", "count"])
    assert (raised.value.row, raised.value.field) == (3, field)
    assert "Nothing of its batch was written" in str(raised.value)
    assert BulkRecord.objects.count() == 0


@ONLY_POSTGRES
@pytest.mark.django_db(transaction=True)
def test_value_the_database_refuses_names_its_row_and_field():
    rows = [("n-1", "1"), ("n-2", "2"), ("n-3", "three"), ("n-4", "4")]
    with pytest.raises(
        BulkDataError,
        # psycopg 3 (binary COPY) finds it in Python; psycopg2 (text COPY) hears it from the server.
        match='Row 3(: invalid input syntax for type integer: "three"| has a bad value for .count.)',
    ) as raised:
        copy_from(BulkRecord, rows, fields=["name", "count"])
    assert (raised.value.row, raised.value.field) == (3, "count")
    assert BulkRecord.objects.count() == 0


@pytest.mark.django_db
def test_bad_arguments_raise_bulk_error_naming_them():
    with pytest.raises(BulkError, match="BulkRecord has no field 'colour'"):
        copy_from(BulkRecord, [], fields=["colour"])
    with pytest.raises(BulkError, match="batch_size must be at least 1"):
        copy_from(BulkRecord, [("a", 1)], fields=["name", "count"], batch_size=0)
    with pytest.raises(BulkError, match="copy_upsert\\(\\) needs unique_fields"):
        copy_upsert(BulkRecord, [], unique_fields=[])
    with pytest.raises(BulkError, match="key 'count' must be the primary key or a unique field"):
        copy_update(BulkRecord, [], key="count", fields=["flag"])
    with pytest.raises(BulkError, match="BulkRecord.count is not unique"):
        next(iter_batches(BulkRecord.objects.all(), key="count"))


# -- copy_to --------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("binary", [False, True])
def test_copy_to_streams_csv_that_reads_back(binary, author):
    rows = [sample(n, author) for n in range(1, 21)]
    copy_from(BulkRecord, rows, fields=FIELDS)
    queryset = BulkRecord.objects.order_by("name").values_list("name", "note", "count", "flag", "data")
    file: Any = io.BytesIO() if binary else io.StringIO(newline="")
    assert copy_to(queryset, file) == 20
    text = file.getvalue().decode() if binary else file.getvalue()
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed[0] == ["name", "note", "count", "flag", "data"]
    assert [line[0] for line in parsed[1:]] == sorted(row["name"] for row in rows)
    by_name = {row["name"]: row for row in rows}
    for line in parsed[1:]:
        row = by_name[line[0]]
        # COPY's CSV writes NULL as an empty unquoted field and "" quoted; the csv module
        # reads both as "", as it would any CSV file.
        assert line[1] == (row["note"] or "")
        assert int(line[2]) == row["count"]
        assert line[3] == ("t" if row["flag"] else "f")


@ONLY_POSTGRES
@pytest.mark.django_db
def test_copy_to_text_format_and_filters():
    copy_from(BulkRecord, [(f"t-{n}", n) for n in range(10)], fields=["name", "count"])
    out = io.StringIO()
    assert (
        copy_to(
            BulkRecord.objects.filter(count__gte=5, name__startswith="t-").values_list("count"),
            out,
            format="text",
        )
        == 5
    )
    assert sorted(int(line) for line in out.getvalue().split()) == [5, 6, 7, 8, 9]


# -- Upsert and update ----------------------------------------------------------------------


@pytest.mark.django_db
def test_copy_upsert_inserts_new_and_updates_existing():
    copy_from(BulkRecord, [(f"u-{n}", n, False) for n in range(5)], fields=["name", "count", "flag"])
    ids = dict(BulkRecord.objects.values_list("name", "pk"))
    rows = [(f"u-{n}", n * 10, True) for n in range(3, 8)]
    written = copy_upsert(
        BulkRecord, rows, fields=["name", "count", "flag"], unique_fields=["name"], update_fields=["count"]
    )
    assert written == 5
    got = {
        name: (count, flag) for name, count, flag in BulkRecord.objects.values_list("name", "count", "flag")
    }
    assert got == {
        "u-0": (0, False),
        "u-1": (1, False),
        "u-2": (2, False),
        "u-3": (30, False),  # updated: count only, as asked
        "u-4": (40, False),
        "u-5": (50, True),  # new
        "u-6": (60, True),
        "u-7": (70, True),
    }
    # Existing rows kept their primary keys (updated in place, not deleted and re-inserted).
    assert {name: pk for name, pk in BulkRecord.objects.values_list("name", "pk") if name in ids} == ids


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["instances", "tuples", "dicts"])
def test_copy_update_sets_fields_by_key(kind):
    copy_from(BulkRecord, [(f"c-{n}", n) for n in range(300)], fields=["name", "count"])
    records = list(BulkRecord.objects.order_by("pk"))
    if kind == "instances":
        for record in records:
            record.count *= -1
            record.note = f"note {record.count}"
        rows: list[Any] = records
    elif kind == "tuples":
        rows = [(record.pk, -record.count, f"note {-record.count}") for record in records]
    else:
        rows = [{"id": r.pk, "count": -r.count, "note": f"note {-r.count}"} for r in records]
    assert copy_update(BulkRecord, rows, fields=["count", "note"], batch_size=100) == 300
    assert all(
        record.note == f"note {record.count}" and record.count <= 0 for record in BulkRecord.objects.all()
    )
    assert sorted(BulkRecord.objects.values_list("count", flat=True)) == sorted(-n for n in range(300))


@pytest.mark.django_db
def test_copy_update_by_another_unique_key():
    copy_from(BulkRecord, [(f"k-{n}", n) for n in range(20)], fields=["name", "count"])
    assert (
        copy_update(BulkRecord, [(f"k-{n}", 100 + n) for n in range(10)], key="name", fields=["count"]) == 10
    )
    assert sorted(BulkRecord.objects.values_list("count", flat=True)) == [*range(10, 20), *range(100, 110)]


# -- iter_batches -------------------------------------------------------------------------


@pytest.mark.django_db
def test_iter_batches_one_query_per_batch_each_row_once():
    copy_from(BulkRecord, [(f"b-{n:04d}", n) for n in range(1050)], fields=["name", "count"])
    with CaptureQueriesContext(connections["default"]) as queries:
        batches = list(iter_batches(BulkRecord.objects.filter(count__gte=0), 100))
    assert [len(batch) for batch in batches] == [100] * 10 + [50]
    assert len(queries) == 11
    # Keyset, not OFFSET: every query after the first starts after the last key.
    assert all("OFFSET" not in q["sql"] for q in queries)
    names = [record.name for batch in batches for record in batch]
    assert len(names) == len(set(names)) == 1050


@pytest.mark.django_db
def test_iter_batches_exactly_once_under_concurrent_writes():
    copy_from(BulkRecord, [(f"w-{n:04d}", n) for n in range(500)], fields=["name", "count"])
    original = set(BulkRecord.objects.values_list("pk", flat=True))
    seen: list[int] = []
    deleted: set[int] = set()
    for number, batch in enumerate(iter_batches(BulkRecord.objects.all(), 37)):
        seen.extend(record.pk for record in batch)
        # Between batches another writer deletes rows ahead and behind, inserts new rows
        # (higher keys) and updates rows ahead: OFFSET pagination would skip or repeat rows.
        ahead = list(
            BulkRecord.objects.filter(pk__gt=batch[-1].pk).order_by("pk").values_list("pk", flat=True)[:3]
        )
        behind = list(BulkRecord.objects.filter(pk__lt=batch[0].pk).values_list("pk", flat=True)[:2])
        BulkRecord.objects.filter(pk__in=ahead[:1] + behind).delete()
        deleted.update(ahead[:1])
        BulkRecord.objects.filter(pk__in=ahead[1:]).update(count=-number)
        if number < 5:
            copy_from(BulkRecord, [(f"new-{number}-{n}", 0) for n in range(4)], fields=["name", "count"])
    assert len(seen) == len(set(seen)), "a row was seen twice"
    assert original - deleted <= set(seen), "a row that existed throughout was skipped"
    assert not set(seen) & deleted


@pytest.mark.django_db
def test_iter_batches_adapts_the_size_toward_the_target():
    copy_from(BulkRecord, [(f"a-{n:05d}", n) for n in range(2000)], fields=["name", "count"])
    # Processing takes no time against a 60 s target: the size doubles each batch, to the cap.
    sizes = [len(b) for b in iter_batches(BulkRecord.objects.all(), 10, target_seconds=60, max_size=400)]
    assert sizes[:6] == [10, 20, 40, 80, 160, 320]
    assert set(sizes[6:-1]) == {400}
    # A slow consumer against a tiny target: the size halves, down to the floor.
    slow = []
    for batch in iter_batches(BulkRecord.objects.all(), 80, target_seconds=0.001, min_size=10):
        slow.append(len(batch))
        time.sleep(0.01)  # the slow consumer under test, not a wait for anything
        if len(slow) == 5:
            break
    assert slow == [80, 40, 20, 10, 10]


# -- Backfills ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["instances", "tuples"])
def test_chunks_format_as_row_by_row_does(kind, author):
    """The column-by-column text (psycopg2) is the row-by-row text, whatever the values."""
    rows = [sample(n, author) for n in range(1, 31)]
    rows[3]["note"] = "nul\x00inside"  # no column-wide escaping: one value at a time
    payload: list[Any] = (
        [BulkRecord(**row) for row in rows]
        if kind == "instances"
        else [tuple(row[field] for field in FIELDS) for row in rows]
    )
    model_fields = [BulkRecord._meta.get_field(name) for name in FIELDS]
    # Without the fields filled from defaults: a callable default differs between two calls.
    columns = _Columns(BulkRecord, model_fields, connection, fill=False)
    text = columns.text(payload)
    assert text is not None
    assert text == "".join(map(columns.line, payload))
    # A value no converter takes: the chunk goes row by row, which names the row.
    bad = tuple(object() if field == "count" else rows[5][field] for field in FIELDS)
    assert columns.text([*payload[:5], bad]) is None
