"""Bulk data movement at ``COPY`` speed, and keyset-batched iteration.

* :func:`copy_from`, :func:`copy_to` (:mod:`django_scale.bulk.copy`), :func:`copy_upsert`,
  :func:`copy_update` (:mod:`django_scale.bulk.merge`): ``COPY`` in, out, upsert and update.
* :func:`copy_between`, :func:`plan_copy` (:mod:`django_scale.bulk.pipe`): a queryset on one
  database streamed into a model's table on another, ``COPY`` to ``COPY``.
* :func:`iter_batches`, :func:`iter_bounds`, :func:`key_field` (:mod:`django_scale.bulk.batches`):
  a queryset walked in keyset-paginated batches on a unique key.
* :class:`Progress`, :func:`progress_bar` (:mod:`django_scale.bulk.progress`): a long job's
  progress, drawn on a terminal or a command's stderr.
* :mod:`django_scale.bulk.formats`: what each field type's values become on the wire.
"""

from __future__ import annotations

from django_scale.bulk.batches import iter_batches, iter_bounds, key_field
from django_scale.bulk.copy import copy_from, copy_to
from django_scale.bulk.merge import copy_update, copy_upsert
from django_scale.bulk.pipe import copy_between, plan_copy
from django_scale.bulk.progress import Progress, progress_bar

__all__ = [
    "copy_between",
    "copy_from",
    "copy_to",
    "copy_update",
    "copy_upsert",
    "iter_batches",
    "iter_bounds",
    "key_field",
    "plan_copy",
    "Progress",
    "progress_bar",
]
