"""The ``COPY`` pipe: a queryset's rows on one database streamed into a model's table on another.

:func:`copy_between` compiles the source queryset (``values()``, ``annotate()``, ``F()``,
``Value()``, ``Cast``: renames and transforms in the ORM) to SQL on the source alias and runs
``COPY (SELECT ...) TO STDOUT (FORMAT BINARY)`` there, feeding each block as it comes into
``COPY target (columns) FROM STDIN (FORMAT BINARY)`` on the target alias: no Python object per
row, memory bounded by a few blocks (:mod:`django_scale.bulk.wire`).

Before any row moves, each column's type is checked: the source expression's
``output_field`` against the target field (the same kind of column, else a
:class:`~django_scale.exceptions.BulkError` naming the field and the ``Cast`` to write), then
the real PostgreSQL types of both sides, cast in SQL to the target's where they differ only by
width, so the binary wire is exact. Nothing is truncated: a value too long for the target is
refused by the target database.

With *batch_size*, the source is walked in key ranges (:func:`~django_scale.bulk.batches.iter_bounds`),
each range one ``COPY`` in its own transaction on the target; with *resume*, each batch is
committed together with a checkpoint (the backfill app's
:class:`~django_scale.contrib.backfill.runner.Checkpointer`), so a run stopped at any point
continues after the last committed batch. With *unique_fields*, rows go through a temporary
table and ``INSERT ... ON CONFLICT`` (the same statement as :func:`~django_scale.bulk.copy_upsert`).

Where either database is not PostgreSQL, the same call moves the rows through
``iter_batches(values_list())`` and :func:`~django_scale.bulk.copy_from` (or ``copy_upsert``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from django.core.exceptions import FieldError
from django.core.management.color import no_style
from django.db import connections, router
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model, QuerySet, Value

from django_scale.bulk.batches import _check_shape, iter_bounds, key_field, selected_names
from django_scale.bulk.copy import _is_psycopg3, _quote, _run_batch, copy_from
from django_scale.bulk.merge import copy_upsert, temp_table, upsert_statement
from django_scale.bulk.progress import Progress
from django_scale.bulk.rows import _Columns, _fields, _is_auto_now
from django_scale.bulk.wire import pump_psycopg2, pump_psycopg3
from django_scale.exceptions import BulkError

__all__ = ["CopyPlan", "copy_between", "plan_copy"]

# Django's db_type() spellings that carry the same values (a cast between them refuses, never
# truncates): compared by family. Every other type must match exactly.
_FAMILIES = {
    "varchar": "text",
    "char": "text",
    "text": "text",
    "citext": "text",
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
    "serial": "integer",
    "bigserial": "integer",
    "smallserial": "integer",
}
_WIDTH = re.compile(r"\(.*?\)")


@dataclass
class CopyPlan:
    """What :func:`copy_between` will run: the target fields in order and the source query."""

    model: type[Model]
    fields: list[Field[Any, Any]]
    source: QuerySet[Any]
    source_alias: str
    target_alias: str
    #: Per column, the PostgreSQL type to cast the source column to (``None``: none needed).
    casts: list[str | None]

    @property
    def columns(self) -> str:
        return _quote(connections[self.target_alias], [cast(str, field.column) for field in self.fields])

    def select_sql(self, queryset: QuerySet[Any] | None = None) -> str:
        """Return the ``SELECT`` the source runs (parameters inlined, as ``COPY`` takes none)."""
        queryset = self.source if queryset is None else queryset
        connection = connections[self.source_alias]
        select, params = queryset.query.get_compiler(using=self.source_alias).as_sql()
        inlined = connection.ops.compose_sql(select, params)  # type: ignore[attr-defined]
        if not any(self.casts):
            return cast(str, inlined)
        names = [f"c{n}" for n in range(len(self.casts))]
        outer = ", ".join(
            f"s.{name}" if kind is None else f"s.{name}::{kind}"
            for name, kind in zip(names, self.casts, strict=True)
        )
        return f"SELECT {outer} FROM ({inlined}) AS s({', '.join(names)})"

    def copy_out_sql(self, queryset: QuerySet[Any] | None = None) -> str:
        return f"COPY ({self.select_sql(queryset)}) TO STDOUT (FORMAT BINARY)"

    def copy_in_sql(self, table: str | None = None) -> str:
        connection = connections[self.target_alias]
        table = table or connection.ops.quote_name(self.model._meta.db_table)
        return f"COPY {table} ({self.columns}) FROM STDIN (FORMAT BINARY)"


def _is_values(queryset: QuerySet[Any]) -> bool:
    # QuerySet._fields is set by values()/values_list() (django/db/models/query.py, _values()):
    # the one marker of a values queryset; pinned by tests/test_copy_pipe.py.
    return getattr(queryset, "_fields", None) is not None


def _target_field(model: type[Model], name: str) -> Field[Any, Any]:
    opts = model._meta
    for field in opts.concrete_fields:
        if name in (field.name, field.attname) or (name == "pk" and field.primary_key):
            if getattr(field, "generated", False):
                raise BulkError(
                    f"{model.__name__}.{field.name} is generated by the database; do not select it."
                )
            return field
    known = ", ".join(field.name for field in opts.concrete_fields)
    raise BulkError(
        f"The source column {name!r} is not a field of {model.__name__} ({known}): rename it in the "
        f"queryset, e.g. .values({name}_new=F({name!r})) or .annotate(...)."
    )


def _with_defaults(queryset: QuerySet[Any], model: type[Model], names: list[str]) -> QuerySet[Any]:
    """Add the target's Python-side defaults of fields the source does not give, as constants."""
    given = {_target_field(model, name) for name in names}
    extra: dict[str, Value] = {}
    missing: list[str] = []
    for field in _fields(model, None):
        if field in given or (hasattr(field, "has_db_default") and field.has_db_default()):
            continue
        if _is_auto_now(field):
            extra[field.name] = Value(field.pre_save(model(), True), output_field=field)
        elif field.has_default():
            if callable(field.default):
                raise BulkError(
                    f"{model.__name__}.{field.name} has a callable default, computed per row in Python: "
                    "give it in the source queryset (e.g. .annotate(...)) or as a db_default."
                )
            extra[field.name] = Value(field.get_default(), output_field=field)
        elif not field.null:
            missing.append(field.name)
    if missing:
        raise BulkError(
            f"{model.__name__} fields {', '.join(missing)} are NOT NULL without a default, and the "
            "source does not give them: add them to the queryset, e.g. .values(..., "
            f"{missing[0]}=F('old_name')). No row was copied."
        )
    if not extra:
        return queryset
    try:
        return cast("QuerySet[Any]", queryset.annotate(**extra))
    except ValueError as error:
        raise BulkError(
            f"Give these target fields in the source queryset: {', '.join(extra)} ({error})."
        ) from error


def _kind(field: Any, connection: BaseDatabaseWrapper) -> str:
    spelled = str(field.db_type(connection) or field.get_internal_type()).lower()
    base = _WIDTH.sub("", spelled).split(" check")[0].strip()
    return _FAMILIES.get(base, base)


def _check_kinds(
    plan_fields: list[Field[Any, Any]], outputs: list[Any], names: list[str], target: BaseDatabaseWrapper
) -> None:
    for field, output, name in zip(plan_fields, outputs, names, strict=True):
        want, got = _kind(field, target), _kind(output, target)
        if want != got:
            raise BulkError(
                f"Field {field.model.__name__}.{field.name} is {field.db_type(target)}, but the source "
                f"column {name!r} is {output.db_type(target)} ({type(output).__name__}): convert it in the "
                f"queryset, e.g. Cast({name!r}, output_field={type(field).__name__}(...)). No row was copied."
            )


def _pg_types(connection: BaseDatabaseWrapper, sql: str) -> list[str]:
    """Return the PostgreSQL type names of the columns *sql* returns, without running it."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM ({sql}) AS s LIMIT 0")
        oids = [int(column[1]) for column in cursor.description]
        cursor.execute("SELECT oid, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(%s)", [oids])
        names = dict(cursor.fetchall())
    return [names[oid] for oid in oids]


def plan_copy(queryset: QuerySet[Any], model: type[Model], *, using: str | None = None) -> CopyPlan:
    """Check *queryset*'s columns against *model*'s fields on alias *using*; return the plan.

    Raises :class:`~django_scale.exceptions.BulkError` naming the field when a column has no
    field of that name or a type the field cannot hold; no row is read.
    """
    source_alias = queryset.db
    target_alias = using or router.db_for_write(model)
    if not _is_values(queryset):
        shared = {field.name for field in queryset.model._meta.concrete_fields}
        queryset = queryset.values(
            *[f.attname for f in model._meta.concrete_fields if f.name in shared or f.attname in shared]
        )
    _check_shape(queryset, "pk")
    queryset = _with_defaults(queryset.order_by(), model, selected_names(queryset))
    names = selected_names(queryset)
    fields = [_target_field(model, name) for name in names]
    seen: dict[Field[Any, Any], str] = {}
    for field, name in zip(fields, names, strict=True):
        if field in seen:
            raise BulkError(
                f"The source columns {seen[field]!r} and {name!r} both fill {model.__name__}.{field.name}."
            )
        seen[field] = name
    compiler = queryset.query.get_compiler(using=source_alias)
    try:
        compiler.as_sql()
        # The compiled SELECT's columns, in order, each with its expression (SQLCompiler.select,
        # set by as_sql(): django/db/models/sql/compiler.py); pinned by tests/test_copy_pipe.py.
        outputs = [expression.output_field for expression, _sql, _alias in compiler.select]
    except FieldError as error:
        raise BulkError(
            f"A source column has no type Django can tell: {error}; give it output_field=."
        ) from error
    if len(outputs) != len(names):
        raise BulkError("The source queryset selects columns that are not among its values() (extra()?).")
    target = connections[target_alias]
    _check_kinds(fields, outputs, names, target)
    plan = CopyPlan(model, fields, queryset, source_alias, target_alias, [None] * len(fields))
    source = connections[source_alias]
    if source.vendor == target.vendor == "postgresql":
        got = _pg_types(source, plan.select_sql())
        table = target.ops.quote_name(model._meta.db_table)
        want = _pg_types(target, f"SELECT {plan.columns} FROM {table}")
        plan.casts = [None if a == b else b for a, b in zip(got, want, strict=True)]
    return plan


def _pump(plan: CopyPlan, batch: QuerySet[Any], table: str | None = None) -> int:
    pump = pump_psycopg3 if _is_psycopg3(connections[plan.target_alias]) else pump_psycopg2
    if _is_psycopg3(connections[plan.source_alias]) != _is_psycopg3(connections[plan.target_alias]):
        raise BulkError("copy_between() needs the same PostgreSQL driver on both aliases.")
    return pump(plan.source_alias, plan.target_alias, plan.copy_out_sql(batch), plan.copy_in_sql(table))


def _merge_select(plan: CopyPlan, remap: dict[Field[Any, Any], Field[Any, Any]]) -> tuple[str, str] | None:
    """The ``SELECT`` list and joins translating each remapped key through its parent's table."""
    if not remap:
        return None
    quote = connections[plan.target_alias].ops.quote_name
    columns = []
    joins: list[str] = []
    for field in plan.fields:
        old_key = remap.get(field)
        if old_key is None:
            columns.append(f"t.{quote(cast(str, field.column))}")
            continue
        parent = cast("type[Model]", field.related_model)
        alias = f"r{len(joins)}"
        target_column = cast(str, field.target_field.column)  # type: ignore[attr-defined]
        columns.append(f"{alias}.{quote(target_column)}")
        # A LEFT JOIN: a key without its parent becomes NULL, which the NOT NULL column refuses
        # (naming it), instead of the row going missing.
        joins.append(
            f" LEFT JOIN {quote(parent._meta.db_table)} AS {alias}"
            f" ON {alias}.{quote(cast(str, old_key.column))} = t.{quote(cast(str, field.column))}"
        )
    return ", ".join(columns), "".join(joins)


def _batch_work(
    plan: CopyPlan,
    batch: QuerySet[Any],
    unique: Sequence[Field[Any, Any]] | None,
    updates: Sequence[Field[Any, Any]],
    remap: dict[Field[Any, Any], Field[Any, Any]],
) -> Callable[[], int]:
    target = connections[plan.target_alias]
    if unique is None and not remap:
        return lambda: _pump(plan, batch)
    table = target.ops.quote_name(plan.model._meta.db_table)
    temp, create, drop = temp_table(target, table, plan.columns)
    statement = upsert_statement(
        target, plan.columns, unique or [], updates, select=_merge_select(plan, remap)
    )

    def work() -> int:
        with target.cursor() as cursor:
            cursor.execute(create)
            _pump(plan, batch, temp)
            cursor.execute(statement(temp, table))
            written = int(cursor.rowcount)
            cursor.execute(drop)
            return written

    return work


def _remaps(model: type[Model], remap: dict[str, str] | None) -> dict[Field[Any, Any], Field[Any, Any]]:
    found: dict[Field[Any, Any], Field[Any, Any]] = {}
    for name, old_key in (remap or {}).items():
        field = _target_field(model, name)
        parent = field.related_model
        if not field.many_to_one and not field.one_to_one or not isinstance(parent, type):
            raise BulkError(f"remap: {model.__name__}.{field.name} is not a foreign key.")
        found[field] = _target_field(parent, old_key)
        if not (found[field].unique or found[field].primary_key):
            raise BulkError(f"remap: {parent.__name__}.{old_key} must be unique to translate keys by it.")
    return found


def _ranges(
    plan: CopyPlan, batch_size: int | None, key: str, start_after: Any
) -> Iterator[tuple[Any, QuerySet[Any]]]:
    """Yield ``(upto, batch)``: the source in closed key ranges, or whole (``upto`` ``None``)."""
    if batch_size is None:
        yield None, plan.source
        return
    name = key_field(plan.source.model, key).name
    for after, upto in iter_bounds(plan.source, batch_size, key=key, start_after=start_after):
        batch = plan.source.filter(**{f"{name}__lte": upto})
        yield upto, batch if after is None else batch.filter(**{f"{name}__gt": after})


def copy_between(
    queryset: QuerySet[Any],
    model: type[Model],
    *,
    using: str | None = None,
    batch_size: int | None = None,
    key: str = "pk",
    resume: str | None = None,
    unique_fields: Sequence[str] | None = None,
    update_fields: Sequence[str] | None = None,
    remap: dict[str, str] | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> int:
    """Copy *queryset*'s rows (on its own alias) into *model*'s table on alias *using*; return the count.

    *queryset* names the target's fields: a ``values()`` (or ``values_list()``) queryset whose
    column names are *model*'s field names or attnames, renamed and transformed in the ORM
    (``values("id", "publisher_id", nickname=F("name"), secret_identity=Value("Clark Kent"))``);
    a plain queryset copies the fields both models share by name. Target fields not given take
    their default (a constant; a callable default must be given) or ``db_default``.

    *batch_size*: walk the source in ranges of its unique *key* (default: all rows in one
    ``COPY``), each batch its own transaction on the target. *resume*: a checkpoint name
    (needs ``django_scale.contrib.backfill`` installed and migrated on the target): each batch is
    committed with the checkpoint, and a later call with the same name continues after the
    last committed batch (and does nothing once finished). *unique_fields*: upsert, updating
    *update_fields* (default: every other field copied) of rows that exist.

    *remap* translates foreign keys whose parents got new keys on the target:
    ``remap={"publisher": "legacy_id"}`` says the source's ``publisher`` values are the
    ``legacy_id`` of the target's publishers; each is replaced by that publisher's key, in SQL
    on the target (a key with no such publisher is refused, naming the field). PostgreSQL only.
    """
    plan = plan_copy(queryset, model, using=using)
    if resume is not None and batch_size is None:
        raise BulkError("resume= needs batch_size=: a checkpoint is committed after each batch.")
    unique = None if unique_fields is None else [_target_field(model, name) for name in unique_fields]
    if unique is not None:
        missing = [field.name for field in unique if field not in plan.fields]
        if missing:
            raise BulkError(f"unique_fields {missing!r} must be among the columns copied.")
    updates = (
        _fields(model, update_fields)
        if update_fields is not None
        else [field for field in plan.fields if unique is not None and field not in unique]
    )
    remaps = _remaps(model, remap)
    source, target = connections[plan.source_alias], connections[plan.target_alias]
    if remaps and target.vendor != "postgresql":
        raise BulkError("remap= needs PostgreSQL as the target; translate the keys in Python instead.")
    if source.vendor != "postgresql" or target.vendor != "postgresql":
        return _fallback(plan, batch_size or 1000, key, resume, unique, updates, progress)
    columns = _Columns(model, plan.fields, target, fill=False)
    what = f"COPY into {model._meta.db_table}"
    return _drive(
        plan,
        batch_size,
        key,
        resume,
        progress,
        lambda offset, batch: _run_batch(
            plan.target_alias, offset, _batch_work(plan, batch, unique, updates, remaps), what, columns
        ),
    )


def _reset_sequences(plan: CopyPlan) -> None:
    """Move the target's id sequence past the ids copied (as ``loaddata`` does), so new rows do not collide."""
    if not any(field.primary_key for field in plan.fields):
        return
    connection = connections[plan.target_alias]
    statements = connection.ops.sequence_reset_sql(no_style(), [plan.model])
    if statements:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)


def _drive(
    plan: CopyPlan,
    batch_size: int | None,
    key: str,
    resume: str | None,
    progress: Callable[[Progress], None] | None,
    run: Callable[[int, QuerySet[Any]], int],
) -> int:
    """Run every batch with *run(offset, batch)*, checkpointed when *resume* names a checkpoint."""
    checkpointer = None
    start_after = None
    if resume is not None:
        from django_scale.contrib.backfill.runner import Checkpointer, decode_key

        checkpointer = Checkpointer(resume, plan.target_alias)
        if checkpointer.finished:
            return 0
        checkpointer.estimate(plan.source.count)
        start_after = decode_key(plan.source.model, key, checkpointer.expected)
    if checkpointer is not None:
        total_rows = checkpointer.checkpoint.rows_total
    else:
        # An exact count (one index scan) for the bar: small next to copying the rows.
        total_rows = plan.source.count() if progress is not None else None
    done = 0 if checkpointer is None else checkpointer.checkpoint.rows_done
    started = time.monotonic()
    copied = 0
    for upto, batch in _ranges(plan, batch_size, key, start_after):

        def work(batch: QuerySet[Any] = batch, offset: int = done) -> int:
            count = run(offset, batch)
            _reset_sequences(plan)
            return count

        n = work() if checkpointer is None else checkpointer.commit(upto, work)
        done += n
        copied += n
        if progress is not None:
            elapsed = max(time.monotonic() - started, 1e-9)
            name = resume or plan.model._meta.db_table
            progress(Progress(name, done, total_rows, n, copied / elapsed))
    if checkpointer is not None:
        checkpointer.finish()
    return copied


def _fallback(
    plan: CopyPlan,
    batch_size: int,
    key: str,
    resume: str | None,
    unique: Sequence[Field[Any, Any]] | None,
    updates: Sequence[Field[Any, Any]],
    progress: Callable[[Progress], None] | None,
) -> int:
    """Where a side is not PostgreSQL: each key range read with ``values_list()``, written with ``copy_from``."""

    def run(offset: int, batch: QuerySet[Any]) -> int:
        rows = batch.values_list(*selected_names(batch))
        names = [_target_field(plan.model, name).name for name in selected_names(rows)]
        if unique is None:
            return copy_from(plan.model, list(rows), fields=names, using=plan.target_alias)
        return copy_upsert(
            plan.model, list(rows), fields=names, unique_fields=[f.name for f in unique],
            update_fields=[f.name for f in updates], using=plan.target_alias,
        )  # fmt: skip

    return _drive(plan, batch_size, key, resume, progress, run)
