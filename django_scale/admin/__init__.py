"""``ScaleModelAdmin``: the project-wide base ``ModelAdmin`` for big tables and replicas."""

from __future__ import annotations

from django_scale.admin.options import (
    ScaleAllValuesFieldListFilter,
    ScaleChangeList,
    ScaleModelAdmin,
    ScaleModelAdminChecks,
    ScaleRelatedFieldListFilter,
    distinct_values,
    selects_whole_table,
)

__all__ = [
    "ScaleAllValuesFieldListFilter",
    "ScaleChangeList",
    "ScaleModelAdmin",
    "ScaleModelAdminChecks",
    "ScaleRelatedFieldListFilter",
    "distinct_values",
    "selects_whole_table",
]
