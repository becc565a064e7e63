"""``COPY`` in, out, upsert and update, for psycopg 3 and psycopg2, with a fallback elsewhere.

* :func:`copy_from` loads model instances, tuples or dicts with ``COPY ... FROM STDIN``.
* :func:`copy_to` streams a queryset out with ``COPY (SELECT ...) TO STDOUT``, in bounded memory.
* :func:`~django_scale.bulk.merge.copy_upsert` and :func:`~django_scale.bulk.merge.copy_update`
  (:mod:`django_scale.bulk.merge`) build on them.

On PostgreSQL the rows go through ``COPY``: with psycopg 3 as binary ``COPY``, each value
dumped in C as its column's type (``Copy.set_types``), or as text for field types without a
safe binary path; with psycopg2 in ``COPY``'s text format, formatted by
:mod:`django_scale.bulk.formats` and read by ``copy_expert`` a chunk at a time. On other
databases (SQLite, the embedded default) the same calls fall back to ``bulk_create`` /
``bulk_update`` in batches, so code using them runs everywhere.

A row the database refuses raises :class:`~django_scale.exceptions.BulkDataError` with the
row's number (from ``COPY``'s line number, or found in Python: a tuple of the wrong length, a
value of the wrong type) and its field when known; its batch is rolled back whole. Nothing is
truncated to fit (PostgreSQL refuses a too-long ``varchar``; ``1.5`` is not taken for an
integer) and no index is dropped.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import importlib
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

from django.db import DatabaseError, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model, QuerySet

from django_scale.bulk.formats import binary_safe
from django_scale.bulk.rows import Row, _Columns, _fields, _RowError
from django_scale.cache.queries.writes import note_statement
from django_scale.conf import count_problem
from django_scale.exceptions import BulkDataError, BulkError

__all__ = ["copy_from", "copy_to"]

M = TypeVar("M", bound=Model)

#: Rows formatted and sent to the server in one write.
CHUNK_ROWS = 4096
#: Batch size of the fallback (``bulk_create``) on databases without ``COPY``.
FALLBACK_BATCH_SIZE = 1000

_LINE = re.compile(r"\bline (\d+)")
_COLUMN = re.compile(r"\bcolumn (\w+)")
_QUOTED_COLUMN = re.compile(r'\bcolumn "([^"]+)"')
_copy_tables = itertools.count()


def _check_batch_size(size: int | None) -> None:
    problem = None if size is None else count_problem(size)
    if problem is not None:
        raise BulkError(f"batch_size {problem.removeprefix('it ')} (or None), not {size!r}.")


def _batches(rows: Iterable[Row], size: int | None) -> Iterator[tuple[int, list[Row] | Iterator[Row]]]:
    """Yield ``(offset, rows)``: one lazy batch of everything, or lists of *size* rows."""
    _check_batch_size(size)
    if size is None:
        yield 0, iter(rows)
        return
    iterator = iter(rows)
    offset = 0
    while batch := list(itertools.islice(iterator, size)):
        yield offset, batch
        offset += len(batch)


def _alias(model: type[Model], using: str | None) -> str:
    return using or router.db_for_write(model)


def _quote(connection: BaseDatabaseWrapper, names: Iterable[str]) -> str:
    return ", ".join(connection.ops.quote_name(name) for name in names)


# -- The COPY wire, for both drivers -----------------------------------------------------


def _is_psycopg3(connection: BaseDatabaseWrapper) -> bool:
    # The backend's driver module: psycopg (3) or psycopg2.
    return bool(getattr(getattr(connection, "Database", None), "__name__", "") == "psycopg")


class _Counted:
    """The rows of a batch on their way into COPY, counted, so an error can name its row."""

    def __init__(self, columns: _Columns, rows: Iterable[Row], offset: int) -> None:
        self.columns = columns
        self.rows = iter(rows)
        self.offset = offset
        self.count = 0
        #: The error found in Python while the driver was reading rows (psycopg2 replaces it).
        self.failure: BulkDataError | None = None

    def _error(self, error: _RowError) -> BulkDataError:
        number = self.offset + self.count + 1
        self.failure = BulkDataError(
            f"Row {number} {error}. Nothing of its batch was written.", row=number, field=error.field or None
        )
        return self.failure

    def chunks(self) -> Iterator[str]:
        """Yield the rows in COPY's text format, a few thousand rows at a time (psycopg2)."""
        columns = self.columns
        while rows := list(itertools.islice(self.rows, CHUNK_ROWS)):
            text = columns.text(rows)
            if text is not None:
                self.count += len(rows)
                yield text
                continue
            # Row by row, counted, so that an error names its row.
            lines = []
            for row in rows:
                try:
                    lines.append(columns.line(row))
                except _RowError as error:
                    raise self._error(error) from error
                self.count += 1
            yield "".join(lines)

    def write_rows(self, copy: Any) -> None:
        """Hand the rows to psycopg 3's ``Copy.write_row``, which formats them in C."""
        adapted = self.columns.adapted
        write_row = copy.write_row
        for row in self.rows:
            try:
                write_row(adapted(row))
            except _RowError as error:
                raise self._error(error) from error
            except Exception as error:
                if getattr(getattr(error, "diag", None), "sqlstate", None):
                    raise  # the server's error, with its line number
                # psycopg could not dump a value: find the field at fault if the checks can.
                try:
                    self.columns.check(row)
                except _RowError as found:
                    raise self._error(found) from error
                raise BulkDataError(
                    f"Row {self.offset + self.count + 1} has a value the driver cannot send: {error}. "
                    "Nothing of its batch was written.",
                    row=self.offset + self.count + 1,
                ) from error
            self.count += 1


class _Reader(io.RawIOBase):
    """A file psycopg2's ``copy_expert`` reads COPY data from, generated lazily."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk.encode()
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _binary_types(cursor: Any, table: str, columns: str) -> list[int] | None:
    """Return the type OIDs of *columns* of *table* if psycopg 3 can dump each in binary."""
    binary = importlib.import_module("psycopg.pq").Format.BINARY

    cursor.execute(f"SELECT {columns} FROM {table} LIMIT 0")
    oids = [int(column.type_code) for column in cursor.description]
    try:
        for oid in oids:
            cursor.adapters.get_dumper_by_oid(oid, binary)
    except Exception:
        return None  # a type without a binary dumper (an extension's): text COPY
    return oids


def _copy_in(connection: BaseDatabaseWrapper, table: str, columns: str, stream: _Counted) -> None:
    """Send *stream* through ``COPY table (columns) FROM STDIN`` on *connection*'s driver.

    psycopg 3 sends binary COPY, each value dumped in C as its column's type; psycopg2 sends
    COPY's text format, formatted here.
    """
    sql = f"COPY {table} ({columns}) FROM STDIN"
    try:
        _send_copy(connection, table, columns, sql, stream)
    finally:
        # The driver's COPY API bypasses execute wrappers: tell the query cache (when on), after
        # the rows are in (in autocommit, noting publishes the table's position at once).
        note_statement(connection, sql)


def _send_copy(connection: BaseDatabaseWrapper, table: str, columns: str, sql: str, stream: _Counted) -> None:
    with connection.cursor() as wrapper:
        cursor: Any = wrapper.cursor
        if _is_psycopg3(connection):
            # Fields of other types (custom ones, IP addresses, ranges) go as text, which the
            # server parses from what Django would send.
            safe = all(binary_safe(field) for field in stream.columns.fields)
            oids = _binary_types(cursor, table, columns) if safe else None
            if oids is None:
                with cursor.copy(sql) as copy:
                    for chunk in stream.chunks():
                        copy.write(chunk)
                return
            with cursor.copy(sql + " (FORMAT BINARY)") as copy:
                copy.set_types(oids)
                stream.write_rows(copy)
        else:
            try:
                cursor.copy_expert(sql, _Reader(stream.chunks()), size=1 << 16)
            except Exception:
                # psycopg2 ends the COPY with "error in .read() call" and raises its own error.
                if stream.failure is not None:
                    raise stream.failure from stream.failure.__cause__
                raise


def _data_error(error: Exception, offset: int, what: str, columns: _Columns) -> BulkDataError:
    """Turn the server's error on a COPY into one naming the row (1-based, over the whole call)."""
    diag = getattr(error, "diag", None)
    context = (getattr(diag, "context", None) or "") if diag is not None else ""
    primary = (getattr(diag, "message_primary", None) or str(error)).strip()
    line = _LINE.search(context)
    found = _COLUMN.search(context) or _QUOTED_COLUMN.search(primary)
    column = found.group(1) if found else None
    field = columns.field_by_column.get(column or "")
    if line:
        row = offset + int(line.group(1))
        return BulkDataError(
            f"Row {row}: {primary}{f' (field {field!r})' if field else ''}. Nothing of its batch was written.",
            row=row,
            field=field,
        )
    return BulkDataError(f"{what} failed: {primary}. Nothing of its batch was written.", field=field)


def _run_batch(alias: str, offset: int, work: Callable[[], int], what: str, columns: _Columns) -> int:
    try:
        with transaction.atomic(using=alias):
            return work()
    except BulkDataError:
        raise
    except Exception as error:
        if getattr(error, "diag", None) is None and not isinstance(error, DatabaseError):
            raise
        # Django wraps the driver's error; the driver's has the server's diagnostics.
        cause = error.__cause__ if isinstance(error.__cause__, Exception) else error
        raise _data_error(cause, offset, what, columns) from error


# -- Public API --------------------------------------------------------------------------


def copy_from(
    model: type[M],
    rows: Iterable[Row],
    *,
    fields: Sequence[str] | None = None,
    using: str | None = None,
    batch_size: int | None = None,
) -> int:
    """Insert *rows* into *model*'s table with ``COPY``; return how many were inserted.

    *rows* are *model* instances, tuples (or lists) of values in *fields* order, or dicts by
    field name (missing keys take the field's default); an iterable of any length, consumed
    once. *fields* default to every concrete field but an auto-incremented primary key, which
    the database assigns (instances do not get their ``pk`` set; use ``bulk_create`` when you
    need it). With *batch_size*, each batch is a ``COPY`` in its own transaction (a savepoint
    inside ``atomic()``); without, all rows are one ``COPY``. Signals are not sent and
    ``save()`` is not called, as with ``bulk_create``.

    On databases without ``COPY``, rows go through ``bulk_create`` in batches.
    """
    _check_batch_size(batch_size)
    alias = _alias(model, using)
    connection = connections[alias]
    columns = _Columns(model, _fields(model, fields), connection)
    if connection.vendor != "postgresql":
        return _fallback_create(model, columns, rows, alias, batch_size)
    table = connection.ops.quote_name(model._meta.db_table)
    cols = _quote(connection, columns.columns)
    total = 0
    for offset, batch in _batches(rows, batch_size):
        stream = _Counted(columns, batch, offset)

        def work(stream: _Counted = stream) -> int:
            _copy_in(connection, table, cols, stream)
            return stream.count

        total += _run_batch(alias, offset, work, f"COPY into {model._meta.db_table}", columns)
    return total


def _instances(model: type[M], columns: _Columns, rows: Iterable[Row], offset: int) -> Iterator[M]:
    for n, row in enumerate(rows, start=offset + 1):
        try:
            # The same checks as on the COPY path, so errors read the same on every database.
            columns.check(row)
            if isinstance(row, model):
                yield row
                continue
            values = columns.values(row)
            yield model(
                **{
                    attname: value.pk if isinstance(value, Model) and field.is_relation else value
                    for attname, value, field in zip(columns.attnames, values, columns.fields, strict=True)
                }
            )
        except _RowError as error:
            raise BulkDataError(
                f"Row {n} {error}. Nothing of its batch was written.", row=n, field=error.field or None
            ) from error


def _fallback_create(
    model: type[M], columns: _Columns, rows: Iterable[Row], alias: str, batch_size: int | None
) -> int:
    total = 0
    for offset, batch in _batches(rows, batch_size or FALLBACK_BATCH_SIZE):
        instances = list(_instances(model, columns, batch, offset))
        try:
            with transaction.atomic(using=alias):
                model._default_manager.using(alias).bulk_create(instances)
        except DatabaseError as error:
            raise BulkDataError(
                f"Rows {offset + 1}-{offset + len(instances)}: {error}. Nothing of this batch was written."
            ) from error
        total += len(instances)
    return total


def copy_to(
    queryset: QuerySet[Any],
    file: IO[Any],
    *,
    format: str = "csv",
    header: bool = True,
) -> int:
    """Write *queryset*'s rows to *file* with ``COPY (SELECT ...) TO STDOUT``; return the row count.

    The rows stream from the server into *file* (text or binary) as they come, so memory stays
    flat whatever the size. The columns are the queryset's: use ``.values_list(...)`` or
    ``.only(...)`` to choose them. *format* is ``"csv"`` or ``"text"`` (COPY's own format).

    On databases without ``COPY``, only ``"csv"`` is available; rows are read with
    ``iterator()`` in chunks.
    """
    if format not in {"csv", "text"}:
        raise BulkError(f'format must be "csv" or "text", not {format!r}.')
    alias = queryset.db
    connection = connections[alias]
    compiler = queryset.query.get_compiler(using=alias)
    if connection.vendor != "postgresql":
        if format != "csv":
            raise BulkError(f'copy_to on {connection.vendor} supports only format="csv".')
        return _fallback_copy_to(queryset, file, header=header)
    select, params = compiler.as_sql()
    options = f"FORMAT {format}" + (", HEADER true" if header and format == "csv" else "")
    # COPY takes no bind parameters: the backend's own client-side quoting inlines them.
    inlined = connection.ops.compose_sql(select, params)  # type: ignore[attr-defined]
    sql = f"COPY ({inlined}) TO STDOUT WITH ({options})"
    text = isinstance(file, io.TextIOBase)
    with connection.cursor() as wrapper:
        cursor: Any = wrapper.cursor
        if _is_psycopg3(connection):
            # A chunk may end inside a multi-byte character: decode incrementally.
            decoder = codecs.getincrementaldecoder("utf-8")() if text else None
            with cursor.copy(sql) as copy:
                for data in copy:
                    file.write(decoder.decode(data) if decoder is not None else data)
        else:
            cursor.copy_expert(sql, file, size=1 << 16)
        return int(cursor.rowcount)


def _fallback_copy_to(queryset: QuerySet[Any], file: IO[Any], *, header: bool) -> int:
    text = isinstance(file, io.TextIOBase)
    target: IO[str] = file if text else io.TextIOWrapper(file, encoding="utf-8", newline="")
    writer = csv.writer(target, lineterminator="\n")
    query = queryset.query
    if query.values_select or getattr(queryset, "_fields", None):
        names = list(query.values_select or ())
        rows = queryset.values_list(*names) if names else queryset
    else:
        names = [field.column for field in queryset.model._meta.concrete_fields]
        rows = queryset.values_list(*[field.attname for field in queryset.model._meta.concrete_fields])
    if header:
        writer.writerow(names)
    count = 0
    for row in rows.iterator(chunk_size=2000):
        writer.writerow(
            [
                "" if value is None else _csv_value(value)
                for value in (
                    row
                    if isinstance(row, tuple)
                    else tuple(row.values())
                    if isinstance(row, dict)
                    else (row,)
                )
            ]
        )
        count += 1
    if not text:
        target.flush()
        target.detach()  # type: ignore[attr-defined]
    return count


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, (bytes, memoryview)):
        return "\\x" + bytes(value).hex()
    return value
