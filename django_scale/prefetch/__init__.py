"""Peer loading: when one row of a result set needs a relation, load it for all its peers.

A queryset built with :class:`~django_scale.querysets.PrefetchAwareQuerySetMixin` gives the
rows it returns one shared :class:`PeerGroup` (one pointer per row, on ``_state``). When code
then reads a relation of one row that nothing loaded yet, the relation is loaded for every
row of the group that lacks it, in one query per relation, and later rows answer from their
caches:

* forward foreign keys and one-to-one fields, and the reverse side of one-to-one fields:
  through Django 6.1's fetch-mode hook on 6.1, and through the descriptors of
  :class:`PrefetchAwareForeignKey` and :class:`PrefetchAwareOneToOneField` on Django 4.2 to
  6.0;
* reverse foreign keys and many-to-many ``.all()``, and ``.count()`` / ``.exists()`` of
  their related managers: through
  :class:`~django_scale.querysets.PrefetchAwareManager`, the manager whose subclasses Django
  builds for related managers, or, when the related model keeps Django's manager, through
  the rows' prefetch cache, which Django's related managers read before they query.

Nothing of Django is patched: the behaviour belongs to the rows of prefetch-aware querysets.
The package detects the N+1 patterns that are left (a relation filtered or sliced per row, a
relation to a model with several managers, none prefetch-aware, peer loading turned off) and eager loads that no
row used; see :func:`detect_n_plus_one`.

What peers loaded is dropped by the writes Django's lazy loading would see (``save()``,
the related managers, many-to-many changes, ``update()`` and ``delete()`` of prefetch-aware
querysets, ``refresh_from_db()``), so results equal Django's; fewer queries is the difference.

Its parts: :mod:`~django_scale.prefetch.peers` (the groups),
:mod:`~django_scale.prefetch.loaders` (one query per relation),
:mod:`~django_scale.prefetch.hooks` (the seams of each Django version),
:mod:`~django_scale.prefetch.plain` (relations to models with Django's managers),
:mod:`~django_scale.prefetch.invalidation` (writes drop what peers cached) and
:mod:`~django_scale.prefetch.detection` (N+1 detection).
"""

from __future__ import annotations

from django_scale.prefetch.detection import Detector, detect_n_plus_one
from django_scale.prefetch.hooks import PrefetchAwareForeignKey, PrefetchAwareOneToOneField, attach_peers
from django_scale.prefetch.loaders import AnyArray, filter_in
from django_scale.prefetch.peers import HAS_FETCH_MODES as HAS_FETCH_MODES
from django_scale.prefetch.peers import PeerGroup, peer_group

__all__ = [
    "AnyArray",
    "Detector",
    "PeerGroup",
    "PrefetchAwareForeignKey",
    "PrefetchAwareOneToOneField",
    "attach_peers",
    "detect_n_plus_one",
    "filter_in",
    "peer_group",
]
