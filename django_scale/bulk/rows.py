"""Rows as the ``copy_*`` functions take them (instances, tuples, dicts), turned into values and text.

:class:`_Columns` reads each row's values for the chosen fields (filling defaults as
``bulk_create`` does) and writes them through :mod:`django_scale.bulk.formats`: a chunk of rows
as ``COPY``'s text format column by column (psycopg2), or a row as values psycopg 3 dumps in
binary. The field selection (:func:`_fields`) is shared by every ``copy_*`` function.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from django_scale.bulk.formats import NULL, binary_adapter, column_converter, text_converter
from django_scale.exceptions import BulkError

Row = Any  # a model instance, a tuple (or list) in field order, or a dict by field name


class _RowError(Exception):
    """A value could not be converted; carries the field name until the row number is known."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Columns:
    """How to turn each row into its values, and each value into what the driver sends.

    *given* are the fields a tuple row lists, in order. With *fill*, every other concrete field
    that has a default or ``auto_now``/``auto_now_add`` is sent too, with the value a new
    instance would get, as ``bulk_create`` does (Django's defaults live in Python, not in the
    table). The auto-incremented primary key is left to the database unless given.
    """

    def __init__(
        self,
        model: type[Model],
        given: Sequence[Field[Any, Any]],
        connection: BaseDatabaseWrapper,
        *,
        fill: bool = True,
    ):
        self.model = model
        self.given = list(given)
        extras: list[Field[Any, Any]] = []
        if fill:
            for field in _fields(model, None):
                if field in self.given or (hasattr(field, "has_db_default") and field.has_db_default()):
                    continue
                if _is_auto_now(field) or field.has_default():
                    extras.append(field)
        self.fields = self.given + extras
        self.names = [field.name for field in self.fields]
        self.columns = [cast(str, field.column) for field in self.fields]
        self.field_by_column = dict(zip(self.columns, self.names, strict=True))
        self.converters = [text_converter(field, connection) for field in self.fields]
        self._columns = [column_converter(field, connection) for field in self.fields]
        self._connection = connection
        self._adapters: list[tuple[int, Callable[[Any], Any]]] | None = None
        self.nullable = [field.null for field in self.fields]
        self.attnames = [field.attname for field in self.fields]
        self._read = operator.attrgetter(*self.attnames) if len(self.attnames) > 1 else None
        self._given_names = [(field.name, field.attname) for field in self.given]
        # Instances: fields whose value is computed at save time (auto_now(_add), files).
        self._pre_save = [(n, field) for n, field in enumerate(self.fields) if _computed_at_save(field)]
        # Tuples and dicts: the other fields' values, computed once unless the default is callable.
        blank = model() if extras else None
        self._extras: list[Callable[[], Any]] = []
        for field in extras:
            if _is_auto_now(field):
                self._extras.append(_returning(field.pre_save(blank, True)))  # type: ignore[arg-type]
            elif callable(field.default):
                self._extras.append(field.get_default)
            else:
                self._extras.append(_returning(field.get_default()))
        self._constant = not any(callable(field.default) for field in extras if not _is_auto_now(field))
        self._constant_extras = tuple(extra() for extra in self._extras) if self._constant else ()
        self._defaults = {field.name: field.get_default for field in self.given}

    def _extra_values(self) -> tuple[Any, ...]:
        return self._constant_extras if self._constant else tuple(extra() for extra in self._extras)

    def values(self, row: Row) -> Sequence[Any]:
        """Return *row*'s values for :attr:`fields`, in order; raise :class:`_RowError`."""
        if isinstance(row, tuple) or isinstance(row, list):  # noqa: SIM101 - the common case first
            if len(row) != len(self.given):
                names = ", ".join(field.name for field in self.given)
                raise _RowError("", f"has {len(row)} values for {len(self.given)} fields ({names})")
            return (*row, *self._extra_values()) if self._extras else row
        if isinstance(row, self.model):
            if self._pre_save:
                values = [getattr(row, attname) for attname in self.attnames]
                for n, field in self._pre_save:
                    values[n] = field.pre_save(row, True)
                return values
            return self._read(row) if self._read is not None else (getattr(row, self.attnames[0]),)
        if isinstance(row, Mapping):
            known = {name for pair in self._given_names for name in pair}
            unknown = set(row) - known
            if unknown:
                raise _RowError(
                    sorted(unknown)[0], f"has keys not among the fields: {', '.join(sorted(unknown))}"
                )
            return [
                *(
                    row[name] if name in row else row[attname] if attname in row else self._defaults[name]()
                    for name, attname in self._given_names
                ),
                *self._extra_values(),
            ]
        raise _RowError(
            "", f"is a {type(row).__name__}; pass {self.model.__name__} instances, tuples or dicts"
        )

    def adapted(self, row: Row) -> Sequence[Any]:
        """Return *row*'s values as psycopg 3 dumps them (JSON as text, related rows as keys)."""
        if self._adapters is None:
            # Built on first use: only the psycopg 3 path needs them (and imports psycopg).
            self._adapters = [
                (n, adapter)
                for n, field in enumerate(self.fields)
                if (adapter := binary_adapter(field, self._connection)) is not None
            ]
        values = self.values(row)
        if not self._adapters:
            return values
        values = list(values)
        for n, adapt in self._adapters:
            value = values[n]
            if value is not None:
                try:
                    values[n] = adapt(value)
                except (TypeError, ValueError, AttributeError) as error:
                    name = self.names[n]
                    raise _RowError(name, f"has a bad value for {name!r}: {error}") from error
        return values

    def line(self, row: Row) -> str:
        """Return *row* as one line of COPY's text format (for psycopg2)."""
        values = self.values(row)
        try:
            return (
                "\t".join(
                    [
                        NULL if value is None else convert(value)
                        for convert, value in zip(self.converters, values, strict=True)
                    ]
                )
                + "\n"
            )
        except (TypeError, ValueError, AttributeError):
            pass
        # Find the value at fault, to name its field.
        for convert, value, name in zip(self.converters, values, self.names, strict=True):
            if value is None:
                continue
            try:
                convert(value)
            except (TypeError, ValueError, AttributeError) as error:
                raise _RowError(name, f"has a bad value for {name!r}: {error}") from error
        raise AssertionError("unreachable: a value failed to convert once and not twice")

    def _transposed(self, rows: list[Row]) -> list[Sequence[Any]] | None:
        """Return the columns of *rows* (instances, or tuples of the right length), or ``None``."""
        kinds = set(map(type, rows))
        if kinds == {self.model}:
            try:
                # A loaded field's value is in the instance's __dict__ under its attname, where
                # its descriptor reads it (DeferredAttribute.__get__): read it there, in C.
                dicts = list(map(vars, rows))
                columns: list[Sequence[Any]] = [
                    list(map(operator.itemgetter(name), dicts)) for name in self.attnames
                ]
            except KeyError:  # a deferred field: its descriptor loads it
                columns = [list(map(operator.attrgetter(name), rows)) for name in self.attnames]
            for n, field in self._pre_save:
                columns[n] = [field.pre_save(row, True) for row in rows]
            return columns
        if not kinds <= {tuple, list} or set(map(len, rows)) != {len(self.given)}:
            return None  # dicts, or a row the per-row path names
        columns = list(zip(*rows, strict=True)) if self.given else []
        if self._extras:
            if self._constant:
                columns.extend([value] * len(rows) for value in self._constant_extras)
            else:
                columns.extend(zip(*(self._extra_values() for _ in rows), strict=True))
        return columns

    def text(self, rows: list[Row]) -> str | None:
        """Return *rows* in COPY's text format (for psycopg2), or ``None``: convert them with :meth:`line`.

        Column by column, a few calls in C per column, when every value converts; else the
        caller goes row by row, which names the row and field at fault.
        """
        columns = self._transposed(rows) if rows and self.fields else None
        texts: list[Sequence[str]] = []
        if columns is not None:
            for convert, values in zip(self._columns, columns, strict=True):
                if None in values:
                    present = [value for value in values if value is not None]
                    done = convert(present) if present else []
                    if done is None:
                        break
                    converted = iter(done)
                    texts.append([NULL if value is None else next(converted) for value in values])
                else:
                    done = convert(values)
                    if done is None:
                        break
                    texts.append(done)
            else:
                return "\n".join(map("\t".join, zip(*texts, strict=True))) + "\n"
        return None

    def check(self, row: Row) -> None:
        """Check *row* as the database would, naming the field (for the ``bulk_create`` fallback)."""
        for value, nullable, name, convert in zip(
            self.values(row), self.nullable, self.names, self.converters, strict=True
        ):
            if value is None:
                if not nullable:
                    raise _RowError(name, f"has None for {name!r}, which is NOT NULL")
                continue
            try:
                convert(value)
            except (TypeError, ValueError, AttributeError) as error:
                raise _RowError(name, f"has a bad value for {name!r}: {error}") from error


def _computed_at_save(field: Field[Any, Any]) -> bool:
    if isinstance(field, models.DateField):
        return _is_auto_now(field)
    return type(field).pre_save is not Field.pre_save


def _returning(value: Any) -> Callable[[], Any]:
    return lambda: value


def _is_auto_now(field: Field[Any, Any]) -> bool:
    return bool(getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False))


def _fields(
    model: type[Model], names: Sequence[str] | None, *, keep_auto_pk: bool = False
) -> list[Field[Any, Any]]:
    opts = model._meta
    if names is None:
        return [
            field
            for field in opts.concrete_fields
            if keep_auto_pk or not (field.primary_key and isinstance(field, models.AutoField))
            if not getattr(field, "generated", False)
        ]
    fields = []
    for name in names:
        try:
            field = opts.pk if name == "pk" else opts.get_field(name)
        except FieldDoesNotExist as error:
            raise BulkError(f"{model.__name__} has no field {name!r} (in fields={list(names)!r}).") from error
        if field is None or not getattr(field, "concrete", False) or field.many_to_many:
            raise BulkError(f"{model.__name__}.{name} is not a concrete column; remove it from fields.")
        fields.append(cast("Field[Any, Any]", field))
    return fields
