"""Bulk data movement at ``COPY`` speed, and keyset-batched iteration.

* :func:`copy_from`, :func:`copy_to`, :func:`copy_upsert`, :func:`copy_update`
  (:mod:`django_scale.bulk.copy`): ``COPY`` in, out, upsert and update, per driver.
* :func:`iter_batches`, :func:`key_field` (:mod:`django_scale.bulk.batches`): a queryset
  walked in keyset-paginated batches on a unique key.
* :mod:`django_scale.bulk.formats`: what each field type's values become on the wire.
"""

from __future__ import annotations

from django_scale.bulk.batches import iter_batches, key_field
from django_scale.bulk.copy import copy_from, copy_to, copy_update, copy_upsert

__all__ = ["copy_from", "copy_to", "copy_update", "copy_upsert", "iter_batches", "key_field"]
