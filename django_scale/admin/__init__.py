"""``ScaleModelAdmin``: the project-wide base ``ModelAdmin`` for big tables and replicas.

The parts, one concept each:

* :mod:`~django_scale.admin.options`: ``ScaleModelAdmin`` (replica GETs, primary POSTs,
  statement timeouts);
* :mod:`~django_scale.admin.changelist`: ``ScaleChangeList`` (approximate counts, ``LIMIT``-ed
  pages, keyset next links);
* :mod:`~django_scale.admin.filters`: list filters that never scan a big table nor list a
  hidden row;
* :mod:`~django_scale.admin.date_hierarchy`: the date hierarchy by index probes;
* :mod:`~django_scale.admin.checks`: ``ScaleModelAdminChecks`` (``django_scale.W3xx``);
* :mod:`~django_scale.admin.fallback`: a statement out of time falls back, the page renders;
* :mod:`~django_scale.admin.responses`: responses render lazily, as Django's, under the
  page's time limit.
"""

from __future__ import annotations

from django_scale.admin.changelist import ScaleChangeList
from django_scale.admin.checks import ScaleModelAdminChecks
from django_scale.admin.filters import (
    ScaleAllValuesFieldListFilter,
    ScaleRelatedFieldListFilter,
    create_filter,
    distinct_values,
    selects_whole_table,
)
from django_scale.admin.options import ScaleModelAdmin

__all__ = [
    "ScaleAllValuesFieldListFilter",
    "ScaleChangeList",
    "ScaleModelAdmin",
    "ScaleModelAdminChecks",
    "ScaleRelatedFieldListFilter",
    "create_filter",
    "distinct_values",
    "selects_whole_table",
]
