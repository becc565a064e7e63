"""Relations to models that keep Django's managers: loaded for all peers through the prefetch cache.

Django's related managers look in the row's prefetch cache before they query. The reverse
foreign key manager's ``get_queryset()`` returns
``instance._prefetched_objects_cache[cache_name]`` when present, and the many-to-many
manager's does too (``get_prefetch_cache()`` on Django 5.2+), as do the many-to-many
``count()`` and ``exists()`` of Django 5.0+, which read that cache before counting on the
through table (django/db/models/fields/related_descriptors.py:
``create_reverse_many_to_one_manager`` and ``create_forward_many_to_many_manager``, Django
4.2 to 6.1). That cache is a dict Django creates only when it prefetches
(``if not hasattr(obj, "_prefetched_objects_cache")`` in ``prefetch_one_level``,
django/db/models/query.py) and otherwise uses as a plain mapping.

The rows of a prefetch-aware result set get a :class:`PeerPrefetchCache` there: a dict whose
``__missing__`` answers a relation nobody prefetched with the queryset Django's manager would
build, already "evaluated" as ``prefetch_related`` leaves it (``_result_cache`` set,
``_prefetch_done``), except that its rows are a :class:`PeerRows` list that loads nothing
until read: reading the rows loads the relation for every peer in one query, and ``len()``
(``count()``) or ``bool()`` (``exists()``) first asks one grouped ``COUNT`` for every peer.
Nothing is stored in the dict, so what Django's prefetch stores there wins, and the rows live
in the group (:attr:`PeerGroup.many <django_scale.prefetch.PeerGroup>`), dropped by writes
(:mod:`~django_scale.prefetch.invalidation`, and the related managers' own writes, which pop
the relation from this dict). ``test_prefetch_plain`` pins these Django seams.

A related model whose default manager is a
:class:`~django_scale.querysets.PrefetchAwareManager` is left to that manager; one with more
than one manager is left alone, since ``obj.rel(manager="other")`` reads this cache as well
and must not see rows of the default manager (checked by W401).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db.models import ForeignObjectRel, Model

from django_scale.prefetch import hooks, loaders, peers

__all__ = [
    "LoadsForPeers",
    "PeerLoad",
    "PeerPrefetchCache",
    "PeerRows",
    "install",
    "plain_relations",
    "shares_cache",
]


class LoadsForPeers:
    """A manager whose related managers load for peers themselves (``PrefetchAwareManager``)."""


class PeerLoad:
    """A related manager's rows (or count), loaded for all peers of its row on first use."""

    __slots__ = ("group", "manager")

    def __init__(self, manager: Any, group: peers.PeerGroup) -> None:
        self.manager = manager
        self.group = group

    def rows(self) -> list[Any] | None:
        relation = loaders.many_relation(self.manager)
        if relation is None:
            return None
        fresh = relation.cache_name not in self.group.many
        loaded = loaders.load_many(self.manager, self.group)
        if loaded is None:
            return None
        if fresh:
            found = [obj for rows in loaded.values() for obj in rows]
            group = hooks.attach_peers(found, self.group.alias, parent=self.group)
            if group is not None:
                install(group)
        return loaders.rows_for(self.manager, loaded)

    def count(self) -> int | None:
        return loaders.count_many(self.manager, self.group)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        # A copied queryset loads on its own: never copy the peers (the whole result set).
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(None), ())


def _loaded(rows: PeerRows) -> list[Any]:
    """Fill *rows* from its load (once) and return it."""
    load = rows.load
    if load is not None:
        rows.load = None
        found = load.rows()
        if found is None:  # cannot be loaded for peers: the row's own query, as Django's
            found = list(load.manager.get_queryset()._chain())
        list.extend(rows, found)
    return rows


def _reading(name: str) -> Any:
    method = getattr(list, name)

    def read(self: PeerRows, *args: Any, **kwargs: Any) -> Any:
        return method(_loaded(self), *args, **kwargs)

    read.__name__ = name
    return read


class PeerRows(list[Any]):
    """The rows of one peer's relation, loaded for all peers when first read.

    ``len()`` and ``bool()`` before that answer from one grouped ``COUNT`` over the peers (so
    ``count()`` and ``exists()`` load no row); every other use loads the rows. A copy or a
    pickle is a plain list.
    """

    __slots__ = ("load",)

    def __init__(self, load: PeerLoad) -> None:
        super().__init__()
        self.load: PeerLoad | None = load

    def __len__(self) -> int:
        load = self.load
        if load is not None:
            counted = load.count()
            if counted is not None:
                return counted
        return list.__len__(_loaded(self))

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[Any]:
        return list.__iter__(_loaded(self))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (list, (list(_loaded(self)),))

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)


for _name in (
    "__getitem__", "__contains__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__reversed__", "__add__", "__mul__", "__rmul__", "__iadd__", "__imul__", "__repr__",
    "__setitem__", "__delitem__", "index", "count", "copy", "append", "extend", "insert",
    "pop", "remove", "reverse", "sort", "clear",
):  # fmt: skip
    setattr(PeerRows, _name, _reading(_name))


def plain_relations(model: type[Model]) -> dict[str, str]:
    """Map the prefetch cache names of *model*'s batchable relations to their accessors.

    Reverse foreign keys and many-to-many relations (both sides) whose related model has one
    manager, a default one that is not prefetch-aware.
    """
    found = _PLAIN.get(model)
    if found is None:
        found = {}
        for relation in model._meta.get_fields():
            if not relation.is_relation or not (relation.one_to_many or relation.many_to_many):
                continue
            related = relation.related_model
            if not isinstance(related, type) or not shares_cache(related):
                continue
            if not isinstance(relation, ForeignObjectRel):
                # A many-to-many field is cached under its name; a generic relation has its
                # own manager. (Django 6.1 no longer calls a many-to-many field concrete.)
                if relation.many_to_many:
                    found[relation.name] = relation.name
                continue
            accessor = relation.get_accessor_name()
            if accessor is None or relation.hidden:
                continue
            if relation.many_to_many:  # the reverse side: cached under the related query name
                found[relation.field.related_query_name()] = accessor
            else:
                found[peers.cache_name(relation)] = accessor
        _PLAIN[model] = found
    return found


_PLAIN: dict[type[Model], dict[str, str]] = {}


def shares_cache(model: type[Model]) -> bool:
    """Whether relations to *model* load for peers through the prefetch cache.

    Its default manager is not prefetch-aware (that one loads for peers itself), and it has
    no other manager that ``obj.rel(manager=...)`` could name.
    """
    return len(model._meta.managers) == 1 and not isinstance(model._default_manager, LoadsForPeers)


class PeerPrefetchCache(hooks.TrackingPrefetchCache):
    """A row's ``_prefetched_objects_cache`` that loads relations for all the row's peers."""

    __slots__ = ("index",)

    def __init__(self, group: peers.PeerGroup, index: int, data: Any = ()) -> None:
        super().__init__(group)
        self.update(data)
        #: The row's place in ``group.members``.
        self.index = index

    def _row(self) -> Model | None:
        members = self.group.members
        return members[self.index] if self.index < len(members) else None

    def __missing__(self, key: str) -> Any:
        group = self.group
        instance = self._row()
        if instance is None or not group.batch or len(group.members) < 2:
            raise KeyError(key)
        accessor = plain_relations(type(instance)).get(key)
        if accessor is None:
            raise KeyError(key)
        manager = getattr(instance, accessor)
        relation = loaders.many_relation(manager)
        if relation is None:
            raise KeyError(key)
        loaded = group.many.get(key)
        if loaded is not None and any(
            row.pk is None for row in loaded.get(instance.__dict__.get(relation.parent_attname), ())
        ):
            group.forget((key,))  # a row was deleted: read the relation again
        # The queryset the manager builds when nothing is cached: its model's default queryset
        # filtered to the row (``_apply_rel_filters``, the method Django's own prefetch calls
        # too), then given rows as prefetch_one_level gives them (django/db/models/query.py:
        # ``qs._result_cache = vals; qs._prefetch_done = True``, Django 4.2 to 6.1).
        queryset = manager._apply_rel_filters(loaders.base_queryset(manager))
        queryset._result_cache = PeerRows(PeerLoad(manager, group))
        queryset._prefetch_done = True
        return queryset

    def pop(self, key: str, *default: Any) -> Any:
        # The related managers' add(), create(), remove(), clear() and set() pop their
        # relation here (``_remove_prefetched_objects()``) before they write: what peers
        # loaded of it is stale, for every row that may have lost or gained rows.
        instance = self._row()
        if instance is not None and key in plain_relations(type(instance)):
            peers.forget(type(instance), (key,))
        return super().pop(key, *default)

    def __reduce__(self) -> Any:
        # A pickled or copied row carries Django's plain cache, never the peers.
        return (dict, (dict(self),))


def install(group: peers.PeerGroup) -> None:
    """Give the rows of *group* a :class:`PeerPrefetchCache`, when their model needs one."""
    if not group.batch or not group.members or not plain_relations(group.model):
        return
    model = group.model
    for index, row in enumerate(group.members):
        current = row.__dict__.get("_prefetched_objects_cache")
        # Django's own cache (a plain dict: rows prefetched before they got peers) keeps
        # what it holds.
        if type(row) is model and (current is None or type(current) is dict):
            row.__dict__["_prefetched_objects_cache"] = PeerPrefetchCache(group, index, current or ())
