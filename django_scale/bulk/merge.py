"""Upsert and update at ``COPY`` speed: rows ``COPY``-ed into a temporary table, then merged.

* :func:`copy_upsert`: ``INSERT ... SELECT ... ON CONFLICT (unique) DO UPDATE`` from it.
* :func:`copy_update`: ``UPDATE ... FROM`` it, linear in the number of rows.
* :func:`upsert_statement` and :func:`temp_table`: the two steps, shared with the ``COPY`` pipe
  (:func:`django_scale.bulk.copy_between`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from django_scale.bulk.copy import (
    FALLBACK_BATCH_SIZE,
    _alias,
    _batches,
    _check_batch_size,
    _copy_in,
    _copy_tables,
    _Counted,
    _instances,
    _quote,
    _run_batch,
)
from django_scale.bulk.rows import Row, _Columns, _fields
from django_scale.exceptions import BulkError

__all__ = ["copy_update", "copy_upsert", "temp_table", "upsert_statement"]

M = TypeVar("M", bound=Model)


def temp_table(connection: BaseDatabaseWrapper, target: str, cols: str) -> tuple[str, str, str]:
    """Return ``(name, create, drop)``: a new temporary table shaped like *cols* of *target*.

    Column types only: no constraints, defaults or sequences of the real table. Run *create*
    and *drop* in the batch's transaction (on an error its rollback removes the table).
    """
    temp = connection.ops.quote_name(f"django_scale_copy_{next(_copy_tables)}")
    return (
        temp,
        f"CREATE TEMPORARY TABLE {temp} AS SELECT {cols} FROM {target} WITH NO DATA",
        f"DROP TABLE {temp}",
    )


def upsert_statement(
    connection: BaseDatabaseWrapper,
    cols: str,
    unique: Sequence[Field[Any, Any]],
    updates: Sequence[Field[Any, Any]],
    *,
    select: tuple[str, str] | None = None,
) -> Callable[[str, str], str]:
    """Return ``statement(temp, target)``: insert *temp*'s rows, updating those whose *unique* exist.

    With no *unique*, a plain insert. *select* is ``(columns, joins)``: what to insert, read
    from *temp* as ``t`` and the tables *joins* adds (default: *cols* of *temp*).
    """
    quote = connection.ops.quote_name
    conflict = _quote(connection, [cast(str, field.column) for field in unique])
    assignments = ", ".join(
        f"{quote(cast(str, field.column))} = EXCLUDED.{quote(cast(str, field.column))}" for field in updates
    )
    action = f"DO UPDATE SET {assignments}" if assignments else "DO NOTHING"
    tail = f" ON CONFLICT ({conflict}) {action}" if unique else ""
    columns, joins = select if select is not None else (cols, "")

    def statement(temp: str, target: str) -> str:
        return f"INSERT INTO {target} ({cols}) SELECT {columns} FROM {temp} AS t{joins}{tail}"

    return statement


def _via_temp_table(
    model: type[Model],
    columns: _Columns,
    rows: Iterable[Row],
    alias: str,
    batch_size: int | None,
    statement: Callable[[str, str], str],
    what: str,
) -> int:
    """COPY *rows* into a temporary table per batch, then run *statement(temp, target)*."""
    connection = connections[alias]
    target = connection.ops.quote_name(model._meta.db_table)
    cols = _quote(connection, columns.columns)
    total = 0
    for offset, batch in _batches(rows, batch_size):
        temp, create, drop = temp_table(connection, target, cols)
        stream = _Counted(columns, batch, offset)

        def work(stream: _Counted = stream, temp: str = temp, create: str = create, drop: str = drop) -> int:
            with connection.cursor() as cursor:
                cursor.execute(create)
                _copy_in(connection, temp, cols, stream)
                cursor.execute(statement(temp, target))
                written = int(cursor.rowcount)
                cursor.execute(drop)
                return written

        total += _run_batch(alias, offset, work, what, columns)
    return total


def copy_upsert(
    model: type[M],
    rows: Iterable[Row],
    *,
    unique_fields: Sequence[str],
    update_fields: Sequence[str] | None = None,
    fields: Sequence[str] | None = None,
    using: str | None = None,
    batch_size: int | None = None,
) -> int:
    """Insert *rows*, updating those whose *unique_fields* already exist; return rows written.

    The rows are ``COPY``-ed into a temporary table, then ``INSERT ... SELECT ... ON CONFLICT
    (unique_fields) DO UPDATE SET`` each of *update_fields* (default: every field copied but
    the unique ones). The unique fields must have a unique constraint or index. Two rows with the
    same unique values in one batch are an error (PostgreSQL cannot update a row twice).

    On databases without ``COPY``: ``bulk_create(update_conflicts=True)`` in batches.
    """
    if not unique_fields:
        raise BulkError("copy_upsert() needs unique_fields, e.g. unique_fields=['slug'].")
    _check_batch_size(batch_size)
    alias = _alias(model, using)
    connection = connections[alias]
    chosen = _fields(model, fields)
    names = {field.name for field in chosen} | {field.attname for field in chosen}
    missing = [name for name in unique_fields if name not in names and name != "pk"]
    if missing:
        raise BulkError(
            f"unique_fields {missing!r} must be among the fields copied ({[f.name for f in chosen]})."
        )
    unique = _fields(model, unique_fields)
    updates = (
        _fields(model, update_fields)
        if update_fields is not None
        else [field for field in chosen if field not in unique]
    )
    columns = _Columns(model, chosen, connection)
    if connection.vendor != "postgresql":
        total = 0
        for offset, batch in _batches(rows, batch_size or FALLBACK_BATCH_SIZE):
            instances = list(_instances(model, columns, batch, offset))
            with transaction.atomic(using=alias):
                model._default_manager.using(alias).bulk_create(
                    instances,
                    update_conflicts=True,
                    unique_fields=[field.name for field in unique],
                    update_fields=[field.name for field in updates],
                )
            total += len(instances)
        return total
    statement = upsert_statement(connection, _quote(connection, columns.columns), unique, updates)
    return _via_temp_table(
        model, columns, rows, alias, batch_size, statement, f"upsert into {model._meta.db_table}"
    )


def copy_update(
    model: type[M],
    rows: Iterable[Row],
    *,
    fields: Sequence[str],
    key: str = "pk",
    using: str | None = None,
    batch_size: int | None = None,
) -> int:
    """Set *fields* on the rows matched by *key*; return how many rows were updated.

    *rows* are instances (their *key* and *fields* are read), tuples ``(key, *fields)`` or
    dicts. The rows are ``COPY``-ed into a temporary table and applied with one
    ``UPDATE ... FROM``: linear in the number of rows, unlike ``bulk_update``'s ``CASE WHEN``.

    On databases without ``COPY``: ``bulk_update`` in batches.
    """
    if not fields:
        raise BulkError("copy_update() needs fields, the fields to set, e.g. fields=['title'].")
    _check_batch_size(batch_size)
    alias = _alias(model, using)
    connection = connections[alias]
    [key_field] = _fields(model, [key])
    updates = _fields(model, fields)
    if key_field in updates:
        raise BulkError(f"key {key!r} cannot also be in fields; it selects the rows to update.")
    if not (key_field.primary_key or key_field.unique):
        raise BulkError(f"key {key!r} must be the primary key or a unique field of {model.__name__}.")
    columns = _Columns(model, [key_field, *updates], connection, fill=False)
    if connection.vendor != "postgresql":
        total = 0
        manager = model._default_manager.using(alias)
        for offset, batch in _batches(rows, batch_size or FALLBACK_BATCH_SIZE):
            instances = list(_instances(model, columns, batch, offset))
            with transaction.atomic(using=alias):
                if not key_field.primary_key:
                    # bulk_update() matches on the primary key: look it up by the unique key.
                    keys = [getattr(instance, key_field.attname) for instance in instances]
                    pks = dict(
                        manager.filter(**{f"{key_field.name}__in": keys}).values_list(key_field.attname, "pk")
                    )
                    instances = [
                        instance for instance in instances if getattr(instance, key_field.attname) in pks
                    ]
                    for instance in instances:
                        instance.pk = pks[getattr(instance, key_field.attname)]
                total += manager.bulk_update(instances, [field.name for field in updates])
        return total
    quote = connection.ops.quote_name
    key_column = quote(cast(str, key_field.column))
    assignments = ", ".join(f"{quote(cast(str, f.column))} = s.{quote(cast(str, f.column))}" for f in updates)

    def statement(temp: str, target: str) -> str:
        return (
            f"UPDATE {target} AS t SET {assignments} FROM {temp} AS s WHERE t.{key_column} = s.{key_column}"
        )

    return _via_temp_table(
        model, columns, rows, alias, batch_size, statement, f"update of {model._meta.db_table}"
    )
