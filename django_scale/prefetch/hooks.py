"""How rows get their peers, through the seams each Django version offers.

* Django 6.1: every row has a fetch mode (``QuerySet.fetch_mode()``), which Django asks
  before a lazy load of a forward foreign key, a one-to-one field or a deferred field. The
  rows of a group carry a :class:`PeerFetchMode` that loads for all of them.
* Django 4.2 to 6.0: the lazy load happens in the related descriptor's ``__get__``, which a
  field names through its ``forward_related_accessor_class`` and ``related_accessor_class``.
  :class:`PrefetchAwareForeignKey` and :class:`PrefetchAwareOneToOneField` name descriptors
  that load for all peers of the row first (on 6.1 they are Django's fields).

Reverse foreign keys and many-to-many relations load through the related manager, which
Django builds from the related model's manager
(:class:`~django_scale.querysets.PrefetchAwareManager`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import models
from django.db.models import Model
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
    ForwardOneToOneDescriptor,
    ReverseOneToOneDescriptor,
)

from django_scale.prefetch.invalidation import key_changed
from django_scale.prefetch.loaders import load_single
from django_scale.prefetch.peers import HAS_FETCH_MODES, PeerFieldsCache, PeerGroup, cache_name, peer_group

__all__ = [
    "PEER_FETCH",
    "PrefetchAwareForeignKey",
    "PrefetchAwareOneToOneField",
    "TrackingFieldsCache",
    "TrackingPrefetchCache",
    "attach_peers",
    "is_default_mode",
    "load_for_peers",
]

if TYPE_CHECKING:
    _ForeignKeyBase = models.ForeignKey[Any, Any]
    _OneToOneFieldBase = models.OneToOneField[Any, Any]
else:
    _ForeignKeyBase = models.ForeignKey
    _OneToOneFieldBase = models.OneToOneField


def load_for_peers(instance: Model, relation: Any) -> None:
    """Load the single-valued *relation* for *instance* and every peer lacking it, if it has peers."""
    if relation.is_cached(instance):
        return
    group = peer_group(instance)
    if group is None or len(group.members) < 2:
        return
    loaded = load_single(group, instance, cache_name(relation))
    if loaded is not None:
        attach_peers(loaded, group.alias, parent=group)


# -- Django 6.1: the fetch-mode hook ----------------------------------------------------------


def _fetch_one() -> Any:
    from django.db.models import FETCH_ONE  # type: ignore[attr-defined,unused-ignore]

    return FETCH_ONE


if HAS_FETCH_MODES:
    from django.db.models.fetch_modes import FetchMode  # type: ignore[import-not-found,unused-ignore]

    class PeerFetchMode(FetchMode):  # type: ignore[misc,unused-ignore]
        """Django 6.1's fetch-mode hook, answered with django-scale's peer groups.

        Unlike ``FETCH_PEERS`` it needs no weak reference per row, and follow-up loads use the
        alias the rows came from.
        """

        __slots__ = ("group",)
        track_peers = False

        def __init__(self, group: PeerGroup | None = None) -> None:
            #: The rows that carry this mode (``None`` for the queryset-level default).
            self.group = group

        def fetch(self, fetcher: Any, instance: Model) -> None:
            group = peer_group(instance)
            relation = getattr(fetcher, "related", None) or getattr(fetcher, "field", None)
            if group is None or len(group.members) < 2 or relation is None:
                fetcher.fetch_one(instance)
                return
            if getattr(relation, "is_relation", False):
                loaded = load_single(group, instance, cache_name(relation))
                if loaded is not None:
                    attach_peers(loaded, group.alias, parent=group)
                if loaded is None or not relation.is_cached(instance):
                    fetcher.fetch_one(instance)
                return
            # A deferred field: Django's own peer fetch loads it for the rows lacking it.
            fetcher.fetch_many([row for row in group.members if row._state.db == instance._state.db])

        def __reduce__(self) -> Any:
            # A pickled row or queryset loads as Django's default would.
            return (_fetch_one, ())

    #: The fetch mode of rows that have peers (Django 6.1+).
    PEER_FETCH: Any = PeerFetchMode()
else:
    PEER_FETCH = None


def is_default_mode(mode: Any) -> bool:
    """Whether a queryset's fetch mode leaves its rows to peer loading (Django 6.1+).

    Django's default ``FETCH_ONE`` does (a prefetch-aware queryset is the opt-in); an
    explicit ``FETCH_PEERS`` or ``FETCH_RAISE`` is the caller's choice and is left alone.
    """
    return mode is _fetch_one() or (HAS_FETCH_MODES and isinstance(mode, PeerFetchMode))


# -- Django 4.2 to 6.0: the related descriptors ----------------------------------------------


_MISSING = object()


def _key_was_set(field: Any, instance: Any, before: Any) -> None:
    """After Django's descriptor set a forward key: a changed key invalidates its parent's relation.

    A reverse foreign key's bulk ``add()`` sets the key on each row this way, then writes with
    the model's base manager, where no signal tells (django/db/models/fields/related_descriptors.py,
    ``create_reverse_many_to_one_manager``, ``add()``'s ``check_and_update_obj``). A row being
    built (no key yet) is in no cache.
    """
    after = instance.__dict__.get(field.attname, _MISSING)
    if before is not _MISSING and before != after:
        key_changed(field, None if after is _MISSING else after)


class _PeerForwardMixin:
    """A forward descriptor that loads the relation for all peers of the row, then reads it,
    and notes a changed key (so the groups that cached the old one drop it)."""

    field: Any

    def __get__(self, instance: Any, cls: Any = None) -> Any:
        if instance is not None and not HAS_FETCH_MODES:
            load_for_peers(instance, self.field)
        return super().__get__(instance, cls)  # type: ignore[misc]

    def __set__(self, instance: Any, value: Any) -> None:
        before = instance.__dict__.get(self.field.attname, _MISSING)
        super().__set__(instance, value)  # type: ignore[misc]
        _key_was_set(self.field, instance, before)


class _PeerForwardManyToOneDescriptor(_PeerForwardMixin, ForwardManyToOneDescriptor):  # type: ignore[type-arg,unused-ignore]
    """``post.reporter``: loads the relation for all peers of the row, then reads it."""


class _PeerForwardOneToOneDescriptor(_PeerForwardMixin, ForwardOneToOneDescriptor):  # type: ignore[type-arg,unused-ignore]
    """``profile.reporter``: loads the relation for all peers of the row, then reads it."""


class _PeerReverseOneToOneDescriptor(ReverseOneToOneDescriptor):  # type: ignore[type-arg,unused-ignore]
    """``reporter.profile``: loads the relation for all peers of the row, then reads it."""

    def __get__(self, instance: Any, cls: Any = None) -> Any:
        if instance is not None:
            load_for_peers(instance, self.related)
        return super().__get__(instance, cls)


class PrefetchAwareForeignKey(_ForeignKeyBase):
    """A ``ForeignKey`` whose lazy loads load for all peers of the row on Django 4.2 to 6.0.

    Django 6.1's fetch modes give every foreign key of a prefetch-aware queryset's rows peer
    loading; on older Django only this field's descriptor can. On every version, changing
    the key of a row (a reverse foreign key's bulk ``add()`` does) drops what peers cached
    of the parent's reverse relation. Migrations see Django's ``ForeignKey``: switching a
    field to this one needs no migration.
    """

    forward_related_accessor_class = _PeerForwardManyToOneDescriptor

    def deconstruct(self) -> Any:
        name, _path, args, kwargs = super().deconstruct()
        return name, "django.db.models.ForeignKey", args, kwargs


class PrefetchAwareOneToOneField(_OneToOneFieldBase):
    """A ``OneToOneField`` whose lazy loads (both sides) load for all peers on Django 4.2 to 6.0.

    See :class:`PrefetchAwareForeignKey`. Migrations see Django's ``OneToOneField``.
    """

    forward_related_accessor_class = _PeerForwardOneToOneDescriptor
    if not HAS_FETCH_MODES:
        related_accessor_class = _PeerReverseOneToOneDescriptor

    def deconstruct(self) -> Any:
        name, _path, args, kwargs = super().deconstruct()
        return name, "django.db.models.OneToOneField", args, kwargs


# -- Use of eager loads (N+1 detection) -------------------------------------------------------


class TrackingFieldsCache(PeerFieldsCache):
    """A row's field cache that records which ``select_related`` relations were read.

    Only rows loaded inside a detection scope that reports unused eager loads get one; see
    :class:`~django_scale.prefetch.peers.PeerFieldsCache` for why Django reads it.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        # Only a hit is a use: Django also looks up keys it is about to load.
        if key in self.group.eager:
            self.group.used.add(key)
        return value


class TrackingPrefetchCache(dict[str, Any]):
    """A row's ``_prefetched_objects_cache`` that records which prefetched relations were read.

    Django reads a prefetched relation as ``instance._prefetched_objects_cache[cache_name]``
    (the related managers' ``get_queryset()`` in django/db/models/fields/related_descriptors.py).
    """

    __slots__ = ("group",)

    def __init__(self, group: PeerGroup) -> None:
        super().__init__()
        self.group = group

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if key in self.group.eager:
            self.group.used.add(key)
        return value


# -- Making rows peers ------------------------------------------------------------------------


def attach_peers(
    instances: list[Model],
    alias: str,
    *,
    batch: bool = True,
    eager: dict[str, str] | None = None,
    parent: PeerGroup | None = None,
) -> PeerGroup | None:
    """Make *instances* (rows of one result set, from *alias*) peers of each other.

    Return their group, or ``None`` for fewer than two rows: a single object has no peers.
    Rows loaded for the rows of a *parent* group are released with it.
    """
    if len(instances) < 2:
        return None
    group = PeerGroup(instances, alias, batch=batch)
    if parent is not None:
        parent.children.append(group)
    if eager:
        group.eager = eager
    if HAS_FETCH_MODES:
        # A per-group mode replaces the one every row already has, which costs nothing.
        mode = group.mode = PeerFetchMode(group)
        fetch_one = _fetch_one()
        for row in instances:
            state = row._state
            current = state.fetch_mode  # type: ignore[attr-defined,unused-ignore]
            if current is fetch_one or isinstance(current, PeerFetchMode):
                state.fetch_mode = mode  # type: ignore[attr-defined,unused-ignore]
    # Django 4.2 to 6.0 have no per-row hook: each row's field cache points at the group
    # (PeerFieldsCache). On 6.1 only rows whose eager loads are tracked get one.
    cache_class = TrackingFieldsCache if eager else (None if HAS_FETCH_MODES else PeerFieldsCache)
    if cache_class is not None:
        for row in instances:
            state = row._state
            state.fields_cache = cache_class(group, state.fields_cache)
    return group
