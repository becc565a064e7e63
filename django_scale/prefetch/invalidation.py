"""Invalidation: writes drop the relations peer loading cached for the rows they affect.

Peer loading keeps reverse foreign key and many-to-many rows, and grouped counts, in the
rows' :class:`~django_scale.prefetch.PeerGroup`. Django's lazy loading would query again
after a write, so every write Django makes through public paths drops what it affects, in
every live group that cached it:

* ``post_save`` (``save()``, ``create()``, the related managers' ``create()``,
  ``get_or_create()``, ``update_or_create()`` and their ``bulk=False`` writes): the reverse
  relations of the row's foreign keys, and a reverse one-to-one cached as missing;
* ``m2m_changed`` (many-to-many ``add()``, ``remove()``, ``clear()``, ``set()``): the
  relation on both sides;
* ``update()``, ``delete()``, ``bulk_create()`` and ``bulk_update()`` of a prefetch-aware
  queryset (the related managers' bulk ``remove()`` and ``clear()``): as ``post_save``;
* a changed key through :class:`~django_scale.prefetch.PrefetchAwareForeignKey` (a reverse
  foreign key's bulk ``add()``, which writes with the model's base manager).

The receivers connect when the first model gets a prefetch-aware manager (a project without
one runs none), so every ``add()`` of the process behaves the same. Django skips its
one-query many-to-many ``add()`` (``INSERT ... ON CONFLICT DO NOTHING``) when an
``m2m_changed`` receiver is connected: ``add()`` first reads which rows exist, one more
query. ``post_delete`` is not used: a receiver would turn every cascade into a row-by-row
delete (``Collector.can_fast_delete()``); a row deleted with ``Model.delete()`` leaves the
cached lists that hold another instance of it, and grouped counts, until they are re-read.
"""

from __future__ import annotations

from typing import Any

from django.db.models import ForeignObjectRel, Model
from django.db.models.signals import m2m_changed, post_save

from django_scale.prefetch.peers import any_caching, cache_name, caching_groups, forget

__all__ = ["connect", "key_changed", "model_written", "through_written"]


def _key_targets(field: Any) -> tuple[type[Model], str] | None:
    """The parent model of the foreign key *field* and the cache name of its reverse relation."""
    target = field.remote_field.model
    if not isinstance(target, type) or field.remote_field.parent_link:
        return None
    return target, cache_name(field.remote_field)


def key_changed(field: Any, value: Any = None) -> None:
    """The foreign key *field* of a row changed (to *value*): its parent's reverse relation is stale."""
    if not any_caching():
        return
    found = _key_targets(field)
    if found is None:
        return
    parent, name = found
    forget(parent, (name,))
    if field.one_to_one:
        _forget_missing(parent, field.remote_field, value)


def _forget_missing(parent: type[Model], related: Any, value: Any) -> None:
    """Drop a reverse one-to-one that peers cached as missing, now that a row may exist."""
    key = related.field.foreign_related_fields[0].attname
    for group in caching_groups(parent):
        for row in group.members:
            if (
                (value is None or row.__dict__.get(key) == value)
                and related.is_cached(row)
                and related.get_cached_value(row) is None
            ):
                related.delete_cached_value(row)


def _relations(model: type[Model]) -> list[tuple[Any, tuple[tuple[type[Model], str], ...]]]:
    """For each foreign key of *model*: the key, and the relations a write through it affects."""
    found = _RELATIONS.get(model)
    if found is None:
        found = []
        for field in model._meta.concrete_fields:
            if not field.is_relation or not (field.many_to_one or field.one_to_one):
                continue
            target = _key_targets(field)
            if target is None:
                continue
            affected = [target]
            # A through model of many-to-many relations: those relations, on both sides.
            for relation in target[0]._meta.get_fields(include_hidden=True):
                if not relation.many_to_many:
                    continue
                m2m: Any = relation.remote_field if isinstance(relation, ForeignObjectRel) else relation
                if m2m.remote_field.through is model:
                    affected.append((m2m.model, m2m.name))
                    affected.append((m2m.related_model, m2m.related_query_name()))
            found.append((field, tuple(dict.fromkeys(affected))))
        _RELATIONS[model] = found
    return found


_RELATIONS: dict[type[Model], list[tuple[Any, tuple[tuple[type[Model], str], ...]]]] = {}


def model_written(model: type[Model], instance: Model | None = None) -> None:
    """Rows of *model* were written (*instance*, or a queryset's rows): drop what they affect."""
    if not any_caching():
        return
    for field, affected in _relations(model):
        for parent, name in affected:
            forget(parent, (name,))
        if field.one_to_one:
            value = None if instance is None else instance.__dict__.get(field.attname)
            _forget_missing(field.remote_field.model, field.remote_field, value)


def through_written(through: type[Model]) -> None:
    """Rows of the through model *through* changed: drop its many-to-many relations."""
    model_written(through)


def _saved(sender: Any, instance: Model, raw: bool = False, **kwargs: Any) -> None:
    model_written(type(instance), instance)


def _m2m_changed(sender: Any, action: str, **kwargs: Any) -> None:
    if action in ("post_add", "post_remove", "post_clear"):
        through_written(sender)


def connect() -> None:
    """Connect the receivers (idempotent): done when a model gets a prefetch-aware manager."""
    post_save.connect(_saved, dispatch_uid="django_scale.prefetch.invalidation.saved")
    m2m_changed.connect(_m2m_changed, dispatch_uid="django_scale.prefetch.invalidation.m2m_changed")
