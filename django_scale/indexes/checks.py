"""Index checks that need no database: admin options and models without a serving index
(``W305``–``W307``, ``W404``), foreign keys with their index turned off (``W405``), duplicate
and prefix-duplicate indexes (``W406``, ``W407``).

Each hint is an index to paste into ``Meta.indexes``. Models of Django's own apps
(``django.contrib.*``) are left alone: their tables are yours to index only by migration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.core import checks
from django.core.checks import CheckMessage
from django.db.models import Model

from django_scale.checks import _message
from django_scale.indexes.shapes import (
    IndexShape,
    index_shapes,
    ordering_columns,
    serving_index,
    suggest_index,
)

__all__ = ["check_admin_indexes", "check_model", "check_model_indexes"]

#: Field types whose changelist filter is a range (``DateFieldListFilter``), not an equality.
RANGE_FIELDS = ("DateField", "DateTimeField")


def _order_fields(order: Sequence[tuple[str, bool]]) -> list[str]:
    return [f"-{name}" if descending else name for name, descending in order]


def _w305_admin_ordering(obj: Any, model: type[Model], ordering: Sequence[str], hint: str) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W305",
        f"{type(obj).__name__}.ordering {list(ordering)!r} is served by no index of "
        f"{model._meta.label}: every changelist page sorts the whole table.",
        f"Add {hint} to {model.__name__}.Meta.indexes.",
        obj=type(obj),
    )


def _w306_filter_without_index(obj: Any, model: type[Model], field: str, hint: str) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W306",
        f"{type(obj).__name__}.list_filter filters {model._meta.label} by {field!r}, but no "
        "index serves that filter with the changelist's ordering: a filtered page reads every "
        "matching row to sort them.",
        f"Add {hint} to {model.__name__}.Meta.indexes.",
        obj=type(obj),
    )


def _w307_date_hierarchy_without_index(obj: Any, model: type[Model], field: str, hint: str) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W307",
        f"{type(obj).__name__}.date_hierarchy is {field!r}, which no index of "
        f"{model._meta.label} starts with: each drill-down reads the whole table.",
        f"Add {hint} to {model.__name__}.Meta.indexes (or db_index=True on the field).",
        obj=type(obj),
    )


def _w404_ordering_without_index(model: type[Model], hint: str) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W404",
        f"{model._meta.label}'s default ordering {list(model._meta.ordering or ())!r} is served by no "
        "index: every unsliced or paginated query of it sorts the whole table.",
        f"Add {hint} to Meta.indexes, or drop the default ordering and order where needed.",
        obj=model,
    )


def _w405_foreign_key_without_index(model: type[Model], field: str) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W405",
        f"{model._meta.label}.{field} is a foreign key with db_index=False and no other index "
        "starts with it: joins and related lookups read the whole table, and every delete of "
        "the referenced row scans it for references.",
        f"Remove db_index=False, or add {suggest_index(model, [field])} to Meta.indexes.",
        obj=model,
    )


def _w406_duplicate_index(model: type[Model], redundant: IndexShape, kept: IndexShape) -> CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W406",
        f"{model._meta.label} has the index {redundant.source} on {list(redundant.names)!r}, "
        f"which duplicates {kept.source}: each write updates both and no read needs the second.",
        f"Remove {redundant.source}.",
        obj=model,
    )


def _w407_prefix_duplicate_index(model: type[Model], redundant: IndexShape, kept: IndexShape) -> CheckMessage:
    fix = (
        f"Declare the foreign key with db_index=False: {kept.source} serves its lookups."
        if redundant.foreign_key
        else f"Remove {redundant.source}: {kept.source} serves the same lookups."
    )
    return _message(
        checks.Warning,
        "django_scale.W407",
        f"{model._meta.label} has the index {redundant.source} on {list(redundant.names)!r}, "
        f"which {kept.source} on {list(kept.names)!r} starts with: every write updates both.",
        fix,
        obj=model,
    )


def _checked_models(app_configs: Iterable[AppConfig] | None) -> list[type[Model]]:
    models = (
        [model for config in app_configs for model in config.get_models()]
        if app_configs is not None
        else list(apps.get_models())
    )
    return [
        model
        for model in models
        if model._meta.managed
        and not model._meta.proxy
        and not model._meta.swapped
        and not (model._meta.app_config and model._meta.app_config.name.startswith("django."))
    ]


def check_model_indexes(app_configs: Iterable[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Check models' default ordering, foreign key indexes and duplicate indexes."""
    messages: list[CheckMessage] = []
    for model in _checked_models(app_configs):
        messages.extend(check_model(model))
    return messages


def check_model(model: type[Model]) -> list[CheckMessage]:
    """Check one model's default ordering, foreign key indexes and duplicate indexes."""
    messages: list[CheckMessage] = []
    shapes = index_shapes(model)
    order = ordering_columns(model, model._meta.ordering or ())
    if order and not serving_index(model, order=order, shapes=shapes):
        messages.append(_w404_ordering_without_index(model, suggest_index(model, _order_fields(order))))
    for field in model._meta.concrete_fields:
        if field.many_to_one and not getattr(field, "db_index", True):
            leading = [shape for shape in shapes if shape.plain and shape.names[0] == field.name]
            if not leading:
                messages.append(_w405_foreign_key_without_index(model, field.name))
    messages.extend(_duplicates(model, shapes))
    return messages


def _duplicates(model: type[Model], shapes: Sequence[IndexShape]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    reported: set[int] = set()
    plain = [(position, shape) for position, shape in enumerate(shapes) if shape.plain]
    for position, shape in plain:
        for other_position, other in plain:
            if other_position == position or position in reported:
                continue
            same = len(shape.columns) == len(other.columns) and other.starts_with(shape)
            if same:
                # Of two equal indexes, drop the one that enforces nothing; of two alike, the later.
                if shape.unique and not other.unique:
                    continue
                if shape.unique == other.unique and position < other_position:
                    continue
                reported.add(position)
                messages.append(_w406_duplicate_index(model, shape, other))
            elif not shape.unique and other.starts_with(shape):
                reported.add(position)
                messages.append(_w407_prefix_duplicate_index(model, shape, other))
    return messages


def _field_type(model: type[Model], name: str) -> str:
    return str(model._meta.get_field(name).get_internal_type())


def check_admin_indexes(admin_obj: Any) -> list[CheckMessage]:
    """Check a ``ScaleModelAdmin``'s ordering, filters and date hierarchy against the model's indexes."""
    messages: list[CheckMessage] = []
    model: type[Model] = admin_obj.model
    if model._meta.app_config and model._meta.app_config.name.startswith("django."):
        return messages
    shapes = index_shapes(model)
    ordering = list(admin_obj.ordering or ())
    if ordering:
        order = ordering_columns(model, ordering)
        if order and not serving_index(model, order=order, shapes=shapes):
            messages.append(
                _w305_admin_ordering(admin_obj, model, ordering, suggest_index(model, _order_fields(order)))
            )
    # The changelist's ordering: the admin's, else the model's (Django adds the pk to break ties).
    order = ordering_columns(model, ordering or model._meta.ordering or ()) or ()
    concrete = {field.name for field in model._meta.concrete_fields}
    for entry in admin_obj.list_filter:
        name = entry[0] if isinstance(entry, (list, tuple)) else entry
        if not isinstance(name, str) or name not in concrete:
            continue  # a SimpleListFilter, or a filter across a relation
        if _field_type(model, name) in RANGE_FIELDS:
            served = serving_index(model, order=((name, True),), shapes=shapes)
            fields = [name]
        else:
            served = serving_index(model, equal=[name], order=order, shapes=shapes)
            fields = [name, *(f for f in _order_fields(order) if f.lstrip("-") != name)]
        if not served:
            messages.append(_w306_filter_without_index(admin_obj, model, name, suggest_index(model, fields)))
    hierarchy = admin_obj.date_hierarchy
    if (
        isinstance(hierarchy, str)
        and hierarchy in concrete
        and not serving_index(model, order=((hierarchy, True),), shapes=shapes)
    ):
        messages.append(
            _w307_date_hierarchy_without_index(
                admin_obj, model, hierarchy, suggest_index(model, [f"-{hierarchy}"])
            )
        )
    return messages
