"""COPY's text format and psycopg 3's binary dumping: what each field type's values become.

* :class:`_Columns` turns a row (an instance, a tuple, a dict) into its values, then into one
  line of ``COPY``'s text format (psycopg2) or into values psycopg 3 dumps in binary.
* The field selection helpers (:func:`_fields`) shared by every ``copy_*`` function.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import importlib
import json
import operator
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from django_scale.exceptions import BulkError

Row = Any  # a model instance, a tuple (or list) in field order, or a dict by field name

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_ARRAY_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})

Converter = Callable[[Any], str]


class _RowError(Exception):
    """A value could not be converted; carries the field name until the row number is known."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# -- Formatting values in COPY's text format ---------------------------------------------


def _text(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.translate(_ESCAPES)
    return text


def _plain(value: Any) -> str:
    # int, Decimal, UUID: str() never contains a character COPY must escape.
    return str(value)


def _boolean(value: Any) -> str:
    return "t" if value else "f"


def _float(value: Any) -> str:
    return repr(float(value))


def _date_or_time(value: Any) -> str:
    return cast(str, value.isoformat())


def _duration(value: datetime.timedelta) -> str:
    return f"{value.days} days {value.seconds} seconds {value.microseconds} microseconds"


def _bytea(value: Any) -> str:
    # bytea's hex input format, with COPY's backslash escaped.
    return "\\\\x" + bytes(value).hex()


def _array_literal(value: Any, element: Callable[[Any], str]) -> str:
    parts = []
    for item in value:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, (list, tuple)):
            parts.append(_array_literal(item, element))
        else:
            parts.append('"' + element(item).translate(_ARRAY_ESCAPES) + '"')
    return "{" + ",".join(parts) + "}"


def _unescaped(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Callable[[Any], str]:
    """Return a function giving a value's text form before COPY escaping (for array elements)."""
    kind = field.get_internal_type()
    if kind == "BooleanField":
        return _boolean
    if kind in {"DateField", "DateTimeField", "TimeField"}:
        return _date_or_time
    if kind == "DurationField":
        return _duration
    if kind == "BinaryField":
        return lambda value: "\\x" + bytes(value).hex()
    if kind == "JSONField":
        encoder = getattr(field, "encoder", None)
        return lambda value: json.dumps(value, cls=encoder)
    if kind == "FloatField":
        return _float
    return str


def _converter(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Converter:
    """Return a function turning a Python value of *field* into its COPY text."""
    kind = field.get_internal_type()
    if kind in {"ForeignKey", "OneToOneField"}:
        # The column holds the related row's key; accept the related instance too.
        related = _converter(cast("Field[Any, Any]", field.target_field), connection)  # type: ignore[attr-defined]
        return lambda value: related(value.pk if isinstance(value, Model) else value)
    target = field
    if kind in _INTEGERS:

        def integer(value: Any) -> str:
            if type(value) is int:
                return str(value)
            if isinstance(value, bool) or not isinstance(value, (int, str, decimal.Decimal, float)):
                raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
            return _text(value)

        return integer
    if kind in _TEXTS:
        return _text
    if kind == "BooleanField":
        return _boolean
    if kind == "FloatField":
        return _float
    if kind in {"DecimalField", "UUIDField"}:
        return _plain
    if kind == "DateTimeField":

        def timestamp(value: Any) -> str:
            if isinstance(value, datetime.datetime) and value.tzinfo is not None:
                return value.isoformat()
            # Naive datetimes get Django's own treatment (a warning and the default time zone).
            return _text(target.get_db_prep_save(value, connection).isoformat())

        return timestamp
    if kind in {"DateField", "TimeField"}:
        return _date_or_time
    if kind == "DurationField":
        return _duration
    if kind == "BinaryField":
        return _bytea
    if kind == "JSONField":
        encoder = getattr(target, "encoder", None)
        return lambda value: _text(json.dumps(value, cls=encoder))
    if kind == "ArrayField":
        base = target.base_field  # type: ignore[attr-defined]
        while base.get_internal_type() == "ArrayField":
            base = base.base_field
        element = _unescaped(base, connection)
        return lambda value: _text(_array_literal(value, element))

    def generic(value: Any) -> str:
        prepared = target.get_db_prep_save(value, connection)
        if isinstance(prepared, (bytes, memoryview)):
            return _bytea(prepared)
        if isinstance(prepared, (datetime.date, datetime.time)):
            return prepared.isoformat()
        if isinstance(prepared, bool):
            return _boolean(prepared)
        return _text(prepared)

    return generic


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
        self.converters = [_converter(field, connection) for field in self.fields]
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
                if (adapter := _adapter(field, self._connection)) is not None
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
                        "\\N" if value is None else convert(value)
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


def _adapter(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Callable[[Any], Any] | None:
    """Return how a value must change before psycopg 3 dumps it in binary, or ``None`` when it need not.

    Binary COPY sends each value as its column's type (``set_types``), so a value must be of the
    Python type that type's dumper takes. Only what Django users commonly pass otherwise is
    converted, so the common case costs nothing per value.
    """
    kind = field.get_internal_type()
    if kind in {"ForeignKey", "OneToOneField"}:
        return lambda value: value.pk if isinstance(value, Model) else value
    if kind == "JSONField":
        # psycopg 3 is optional: imported on its own path only.
        Jsonb = importlib.import_module("psycopg.types.json").Jsonb

        dumps = functools.partial(json.dumps, cls=getattr(field, "encoder", None))
        return lambda value: Jsonb(value, dumps=dumps)
    if kind == "DateTimeField":

        def timestamp(value: Any) -> Any:
            if isinstance(value, datetime.datetime) and value.tzinfo is not None:
                return value
            # Naive datetimes get Django's own treatment (a warning and the default time zone).
            return field.get_db_prep_save(value, connection)

        return timestamp
    if kind == "UUIDField":
        return lambda value: value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    if kind == "DecimalField":
        return lambda value: value if type(value) is decimal.Decimal else decimal.Decimal(str(value))
    if kind in _INTEGERS:
        return _integer
    if kind == "FloatField":
        return lambda value: value if type(value) is float else float(value)
    if kind in _TEXTS:
        return lambda value: value if type(value) is str else str(value)
    if kind in {"BooleanField", "DateField", "TimeField", "DurationField"}:
        python_type = {
            "BooleanField": bool,
            "DateField": datetime.date,
            "TimeField": datetime.time,
            "DurationField": datetime.timedelta,
        }[kind]
        # Strings and the like, as Django's own to_python() reads them.
        return lambda value: value if isinstance(value, python_type) else field.to_python(value)
    if kind in {"ArrayField", "BinaryField"}:
        return None
    # Anything else (custom fields): what Django would send.
    return lambda value: field.get_db_prep_save(value, connection)


_INTEGERS = {
    "AutoField",
    "BigAutoField",
    "SmallAutoField",
    "IntegerField",
    "BigIntegerField",
    "SmallIntegerField",
    "PositiveIntegerField",
    "PositiveBigIntegerField",
    "PositiveSmallIntegerField",
}
_TEXTS = {"CharField", "TextField", "SlugField", "EmailField", "URLField", "FilePathField"}


def _integer(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str):
        return int(value)
    if isinstance(value, (float, decimal.Decimal)) and value == int(value):
        return int(value)
    # Never truncate 1.5 to 1, nor take True for 1.
    raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")


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
