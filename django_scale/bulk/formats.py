"""What each field type's values become on the wire: the one per-type conversion table.

:data:`FORMATS` maps a field's ``get_internal_type()`` to a :class:`FieldFormat`, which says,
for that type:

* ``text``: a value as ``COPY``'s text format spells it, escaped (psycopg2, and psycopg 3 for
  tables it cannot send in binary);
* ``element``: a value inside an array literal, before escaping;
* ``binary``: how a value must change before psycopg 3 dumps it in binary as its column's type
  (``None``: it need not), and whether it may go in binary at all;
* ``column``: a whole column of a chunk of rows at once, for speed: a few calls in C per
  column instead of a few Python calls per value.

:func:`text_converter`, :func:`column_converter`, :func:`binary_adapter` and
:func:`binary_safe` read the table for a field; a field type missing from it goes through
Django's ``get_db_prep_save()``.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import importlib
import json
import operator
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

__all__ = [
    "FORMATS",
    "NULL",
    "FieldFormat",
    "binary_adapter",
    "binary_safe",
    "column_converter",
    "text_converter",
]

#: A value turned into its text.
Converter = Callable[[Any], str]
#: A column of values (none of them ``None``) turned into their texts; ``None`` when some value
#: needs the per-value path (which names the row at fault).
ColumnConverter = Callable[[Sequence[Any]], "Sequence[str] | None"]
#: A value changed into what psycopg 3's binary dumper takes.
Adapter = Callable[[Any], Any]
Factory = Callable[["Field[Any, Any]", BaseDatabaseWrapper], Any]

#: ``NULL`` in COPY's text format.
NULL = "\\N"
_SPECIALS = ("\\", "\t", "\n", "\r")
_ARRAY_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})
# PostgreSQL text never holds NUL, so it can separate the values of a column escaped at once.
_SEPARATOR = "\x00"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _text(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return _escape(text)
    return text


def _texts(values: Sequence[Any]) -> Sequence[str] | None:
    """Escape a column of strings in a few passes over one joined string."""
    if set(map(type, values)) != {str}:
        return None
    joined = _SEPARATOR.join(values)
    if not any(special in joined for special in _SPECIALS):
        return values
    if joined.count(_SEPARATOR) != len(values) - 1:
        return None  # a value holds NUL itself (the server refuses it)
    return _escape(joined).split(_SEPARATOR)


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


def _integer_text(value: Any) -> str:
    if type(value) is int:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, str, decimal.Decimal, float)):
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    return _text(value)


def _integers(values: Sequence[Any]) -> Sequence[str] | None:
    if set(map(type, values)) != {int}:
        return None
    return list(map(str, values))


def _integer(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str):
        return int(value)
    if isinstance(value, (float, decimal.Decimal)) and value == int(value):
        return int(value)
    # Never truncate 1.5 to 1, nor take True for 1.
    raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")


def _aware_timestamps(values: Sequence[Any]) -> Sequence[str] | None:
    if set(map(type, values)) != {datetime.datetime} or None in map(operator.attrgetter("tzinfo"), values):
        return None
    return list(map(datetime.datetime.isoformat, values))


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


def _always(function: Any) -> Factory:
    """Return a factory giving *function* whatever the field."""
    return lambda field, connection: function


def _as_python(python_type: type) -> Factory:
    """Return a factory of adapters passing *python_type* values as they are, else ``to_python()``."""

    def factory(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Adapter:
        # Strings and the like, as Django's own to_python() reads them.
        return lambda value: value if isinstance(value, python_type) else field.to_python(value)

    return factory


def _timestamp_text(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Converter:
    def timestamp(value: Any) -> str:
        if isinstance(value, datetime.datetime) and value.tzinfo is not None:
            return value.isoformat()
        # Naive datetimes get Django's own treatment (a warning and the default time zone).
        return _text(field.get_db_prep_save(value, connection).isoformat())

    return timestamp


def _timestamp_binary(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Adapter:
    def timestamp(value: Any) -> Any:
        if isinstance(value, datetime.datetime) and value.tzinfo is not None:
            return value
        # Naive datetimes get Django's own treatment (a warning and the default time zone).
        return field.get_db_prep_save(value, connection)

    return timestamp


def _json_text(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Converter:
    encoder = getattr(field, "encoder", None)
    return lambda value: _text(json.dumps(value, cls=encoder))


def _json_element(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Converter:
    encoder = getattr(field, "encoder", None)
    return lambda value: json.dumps(value, cls=encoder)


def _json_binary(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Adapter:
    # psycopg 3 is optional: imported on its own path only.
    jsonb = importlib.import_module("psycopg.types.json").Jsonb
    dumps = functools.partial(json.dumps, cls=getattr(field, "encoder", None))
    return lambda value: jsonb(value, dumps=dumps)


def _array_text(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Converter:
    base = field.base_field  # type: ignore[attr-defined]
    while base.get_internal_type() == "ArrayField":
        base = base.base_field
    element = _format(base).element(base, connection)
    return lambda value: _text(_array_literal(value, element))


def _generic_text(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Converter:
    def generic(value: Any) -> str:
        prepared = field.get_db_prep_save(value, connection)
        if isinstance(prepared, (bytes, memoryview)):
            return _bytea(prepared)
        if isinstance(prepared, (datetime.date, datetime.time)):
            return prepared.isoformat()
        if isinstance(prepared, bool):
            return _boolean(prepared)
        return _text(prepared)

    return generic


def _generic_binary(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Adapter:
    return lambda value: field.get_db_prep_save(value, connection)


@dataclass(frozen=True)
class FieldFormat:
    """How the values of one field type are written, in text and in binary."""

    #: ``(field, connection) -> (value -> escaped COPY text)``.
    text: Factory = _generic_text
    #: ``(field, connection) -> (value -> text inside an array literal, unescaped)``.
    element: Factory = _always(str)
    #: ``(field, connection) -> (value -> what psycopg 3 dumps)``, or ``None``: sent as it is.
    binary: Factory | None = _generic_binary
    #: Whether psycopg 3 may send the values in binary, as their column's type.
    binary_safe: bool = False
    #: A whole column at once, or ``None``: the text converter over each value.
    column: ColumnConverter | None = None


_INTEGER = FieldFormat(
    text=_always(_integer_text),
    binary=_always(_integer),
    binary_safe=True,
    column=_integers,
)
_STRING = FieldFormat(
    text=_always(_text),
    binary=_always(lambda value: value if type(value) is str else str(value)),
    binary_safe=True,
    column=_texts,
)
_DATE_OR_TIME = {
    kind: FieldFormat(
        text=_always(_date_or_time),
        element=_always(_date_or_time),
        binary=_as_python(python_type),
        binary_safe=True,
    )
    for kind, python_type in (("DateField", datetime.date), ("TimeField", datetime.time))
}

#: The one per-type table: a field's ``get_internal_type()`` to how its values are written.
FORMATS: dict[str, FieldFormat] = {
    **dict.fromkeys(
        (
            "AutoField",
            "BigAutoField",
            "SmallAutoField",
            "IntegerField",
            "BigIntegerField",
            "SmallIntegerField",
            "PositiveIntegerField",
            "PositiveBigIntegerField",
            "PositiveSmallIntegerField",
        ),
        _INTEGER,
    ),
    **dict.fromkeys(
        ("CharField", "TextField", "SlugField", "EmailField", "URLField", "FilePathField"), _STRING
    ),
    **_DATE_OR_TIME,
    "BooleanField": FieldFormat(
        text=_always(_boolean), element=_always(_boolean), binary=_as_python(bool), binary_safe=True
    ),
    "FloatField": FieldFormat(
        text=_always(_float),
        element=_always(_float),
        binary=_always(lambda value: value if type(value) is float else float(value)),
        binary_safe=True,
    ),
    "DecimalField": FieldFormat(
        text=_always(_plain),
        binary=_always(
            lambda value: value if type(value) is decimal.Decimal else decimal.Decimal(str(value))
        ),
        binary_safe=True,
    ),
    "UUIDField": FieldFormat(
        text=_always(_plain),
        binary=_always(lambda value: value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))),
        binary_safe=True,
    ),
    "DateTimeField": FieldFormat(
        text=_timestamp_text,
        element=_always(_date_or_time),
        binary=_timestamp_binary,
        binary_safe=True,
        column=_aware_timestamps,
    ),
    "DurationField": FieldFormat(
        text=_always(_duration),
        element=_always(_duration),
        binary=_as_python(datetime.timedelta),
        binary_safe=True,
    ),
    "BinaryField": FieldFormat(
        text=_always(_bytea),
        element=_always(lambda value: "\\x" + bytes(value).hex()),
        binary=None,
        binary_safe=True,
    ),
    "JSONField": FieldFormat(text=_json_text, element=_json_element, binary=_json_binary, binary_safe=True),
    # Binary when its elements are (see binary_safe()).
    "ArrayField": FieldFormat(text=_array_text, binary=None),
}
#: Field types not in :data:`FORMATS` (custom fields, IP addresses, ranges): what Django would send.
_GENERIC = FieldFormat()
_RELATIONS = {"ForeignKey", "OneToOneField"}


def _format(field: Field[Any, Any]) -> FieldFormat:
    return FORMATS.get(field.get_internal_type(), _GENERIC)


def _target(field: Field[Any, Any]) -> Field[Any, Any] | None:
    """Return the field a relation's column holds the value of, or ``None`` for other fields."""
    if field.get_internal_type() in _RELATIONS:
        return cast("Field[Any, Any]", field.target_field)  # type: ignore[attr-defined]
    return None


def _key(value: Any) -> Any:
    # A relation's column holds the related row's key; accept the related instance too.
    return value.pk if isinstance(value, Model) else value


def text_converter(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Converter:
    """Return a function turning a Python value of *field* into its COPY text."""
    target = _target(field)
    if target is not None:
        related = text_converter(target, connection)
        return lambda value: related(_key(value))
    return cast(Converter, _format(field).text(field, connection))


def column_converter(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> ColumnConverter:
    """Return a function turning a column of non-``None`` values of *field* into their COPY texts.

    It returns ``None`` when a value fails (the caller then converts row by row, to name it).
    """
    target = _target(field)
    if target is not None:
        related = column_converter(target, connection)
        convert = text_converter(field, connection)

        def relation(values: Sequence[Any]) -> Sequence[str] | None:
            if any(issubclass(kind, Model) for kind in set(map(type, values))):
                return _each(convert, values)
            return related(values)

        return relation
    fast = _format(field).column
    convert = text_converter(field, connection)
    if fast is None:
        return functools.partial(_each, convert)

    def column(values: Sequence[Any]) -> Sequence[str] | None:
        done = fast(values)
        return done if done is not None else _each(convert, values)

    return column


def _each(convert: Converter, values: Sequence[Any]) -> Sequence[str] | None:
    try:
        return list(map(convert, values))
    except (TypeError, ValueError, AttributeError):
        return None


def binary_adapter(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Adapter | None:
    """Return how a value must change before psycopg 3 dumps it in binary, or ``None`` when it need not.

    Binary COPY sends each value as its column's type (``set_types``), so a value must be of the
    Python type that type's dumper takes. Only what Django users commonly pass otherwise is
    converted, so the common case costs nothing per value.
    """
    if field.get_internal_type() in _RELATIONS:
        return _key
    factory = _format(field).binary
    return None if factory is None else cast(Adapter, factory(field, connection))


def binary_safe(field: Field[Any, Any]) -> bool:
    """Whether *field*'s values reach psycopg 3 as the Python type its binary dumper takes."""
    target = _target(field)
    if target is not None:
        return binary_safe(target)
    if field.get_internal_type() == "ArrayField":
        return binary_safe(field.base_field)  # type: ignore[attr-defined]
    return _format(field).binary_safe
