"""Peer groups: the rows of one result set, and how a row finds its group."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import django
from django.db.models import Model

__all__ = [
    "HAS_FETCH_MODES",
    "PeerFieldsCache",
    "PeerGroup",
    "any_caching",
    "cache_name",
    "caching_groups",
    "forget",
    "peer_group",
    "remember",
]

#: Django 6.1 has fetch modes (``QuerySet.fetch_mode()``): peer loading builds on their hook.
HAS_FETCH_MODES = django.VERSION >= (6, 1)


def cache_name(relation: Any) -> str:
    """Return the key a relation caches under (``cache_name`` since Django 5.1)."""
    # Django 5.1 replaced get_cache_name() with the cache_name property and deprecated the
    # method; on 4.2 and 5.0 only the method exists.
    if hasattr(type(relation), "cache_name"):
        return str(relation.cache_name)
    return str(relation.get_cache_name())


class PeerGroup:
    """The rows one queryset evaluation (or one ``iterator()`` chunk) returned.

    Each row points at its group from its ``_state`` (its field cache on Django 4.2 to 6.0,
    its fetch mode on 6.1); the group holds the rows in the result list itself. That
    costs at most one pointer per row, where ``FETCH_PEERS`` keeps a weak reference per row.
    """

    __slots__ = (
        "__weakref__",
        "alias",
        "batch",
        "children",
        "counts",
        "eager",
        "ids",
        "many",
        "members",
        "mode",
        "model",
        "reported",
        "singles",
        "states",
        "used",
    )

    def __init__(self, members: list[Model], alias: str, *, batch: bool = True) -> None:
        #: The rows, in result order.
        self.members = members
        #: Their model.
        self.model = type(members[0]) if members else Model
        #: The ``id()`` of each row, built the first time a row's membership must be proved.
        self.ids: frozenset[int] | None = None
        #: The fetch mode its rows carry (Django 6.1+): the group's handle on each row.
        self.mode: Any = None
        #: The database alias the rows came from; follow-up loads use it too.
        self.alias = alias
        #: Whether lazy loads are batched (``False``: loaded one by one, and detected).
        self.batch = batch
        #: The groups of rows loaded for these rows (released with them).
        self.children: list[PeerGroup] = []
        #: Grouped ``count()`` answers: relation cache name -> {parent key: count}.
        self.counts: dict[str, dict[Any, int]] = {}
        #: Rows of reverse foreign keys and many-to-many relations loaded for the peers:
        #: relation cache name -> {parent key: rows}. Held here, not in the rows'
        #: ``_prefetched_objects_cache``, so Django's own prefetching, custom related
        #: managers and ``db_manager()`` never see them.
        self.many: dict[str, dict[Any, list[Model]]] = {}
        #: Each row's ``_prefetched_objects_cache`` (or ``None``) when the group first
        #: cached a relation: a row whose object changed was refreshed (``refresh_from_db()``).
        self.states: dict[int, Any] | None = None
        #: Eager loads (select_related / prefetch_related) to check for use: name -> kind.
        self.eager: dict[str, str] = {}
        #: The eager loads some row used.
        self.used: set[str] = set()
        #: Per relation, the first row that loaded it on its own (N+1 detection).
        self.singles: dict[str, int] = {}
        #: The relations already reported as N+1, so each is reported once per group.
        self.reported: set[str] = set()

    def __reduce__(self) -> Any:
        # A pickled or copied row carries no peers (and never the whole result set).
        return (_no_group, ())

    def release(self) -> None:
        """Forget the rows (and rows loaded for them), so they are freed once the caller drops them."""
        self.members = []
        self.counts = {}
        self.many = {}
        self.states = None
        self.ids = None
        children, self.children = self.children, []
        for child in children:
            child.release()

    def __len__(self) -> int:
        return len(self.members)

    def has(self, instance: Model) -> bool:
        """Whether *instance* is one of the rows (not a row that inherited their fetch mode)."""
        if type(instance) is not self.model:
            return False
        if not self_related(self.model):
            # Only rows of the model carry its group's mode, and only a relation from the
            # model to itself hands that mode to rows of the same model.
            return True
        if self.ids is None:
            self.ids = frozenset(map(id, self.members))
        return id(instance) in self.ids

    def forget(self, names: Iterable[str] | None = None) -> None:
        """Drop the cached rows and counts of the relations *names* (all when ``None``)."""
        if names is None:
            self.many = {}
            self.counts = {}
            self.states = None
            return
        for name in names:
            self.many.pop(name, None)
            self.counts.pop(name, None)

    def refreshed(self, instance: Model) -> bool:
        """Whether *instance* was refreshed from the database since the group cached a relation.

        ``Model.refresh_from_db()`` gives the row a new, empty ``_prefetched_objects_cache``
        (``self._prefetched_objects_cache = {}``, django/db/models/base.py, Django 4.2 to
        6.1) and nothing else public marks it;
        ``test_prefetch.test_refresh_from_db_replaces_the_prefetch_cache`` pins this.
        """
        states = self.states
        if states is None:
            return False
        return instance.__dict__.get("_prefetched_objects_cache") is not states.get(id(instance))

    def record_states(self) -> None:
        """Remember each row's ``_prefetched_objects_cache`` object (see :meth:`refreshed`)."""
        if self.states is None:
            self.states = {id(row): row.__dict__.get("_prefetched_objects_cache") for row in self.members}


#: The live groups that cached relations, by the model of their rows: a write through
#: Django's related managers, ``save()`` or a queryset's ``update()`` / ``delete()`` drops
#: the affected relations from each (:func:`forget`).
_CACHING: dict[type[Model], weakref.WeakSet[PeerGroup]] = {}


def remember(group: PeerGroup) -> None:
    """Register *group* as holding cached relations, so writes can invalidate them."""
    groups = _CACHING.get(group.model)
    if groups is None:
        groups = _CACHING[group.model] = weakref.WeakSet()
    groups.add(group)


def any_caching() -> bool:
    """Whether any group ever cached a relation (else a write has nothing to invalidate)."""
    return bool(_CACHING)


def caching_groups(model: type[Model]) -> list[PeerGroup]:
    """Return the live groups whose rows are *model* (or a subclass or parent of it) with caches."""
    found: list[PeerGroup] = []
    for group_model, groups in list(_CACHING.items()):
        if issubclass(group_model, model) or issubclass(model, group_model):
            found.extend(groups)
    return found


def forget(model: type[Model], names: Iterable[str]) -> None:
    """Drop the relations *names* of *model*'s rows from every live group that cached them."""
    names = tuple(names)
    for group in caching_groups(model):
        group.forget(names)


def _no_group() -> None:
    return None


def peer_group(instance: Model) -> PeerGroup | None:
    """Return the :class:`PeerGroup` of *instance*, or ``None`` when it has no peers."""
    group: PeerGroup | None
    if HAS_FETCH_MODES:
        group = getattr(getattr(instance._state, "fetch_mode", None), "group", None)
        if group is not None and not group.has(instance):
            return None
        return group
    group = getattr(instance._state.fields_cache, "group", None)
    return group


class PeerFieldsCache(dict[str, Any]):
    """A row's ``_state.fields_cache`` that also points at the row's group (Django 4.2 to 6.0).

    The pointer costs 8 bytes more than the dict Django gives every row, where an attribute
    of our own on ``_state`` or on the row would cost a dict of its own (their key-sharing
    dicts cannot take a key added after the rows exist). It is a plain dict otherwise: Django
    reads and writes relation caches through ``FieldCacheMixin`` as
    ``instance._state.fields_cache[cache_name]`` (django/db/models/fields/mixins.py, 4.2 to
    6.1) and never replaces the dict of a live row; copies and pickles get a plain dict
    (``ModelState.__getstate__`` copies it), so a copy has no peers.
    ``test_prefetch.test_the_field_cache_keeps_the_group_through_django_loads`` pins this.
    """

    __slots__ = ("group",)

    def __init__(self, group: PeerGroup, data: Any = ()) -> None:
        super().__init__(data)
        self.group = group


def self_related(model: type[Model]) -> bool:
    """Whether *model* has a relation to itself (or to a parent or child model)."""
    found = _SELF_RELATED.get(model)
    if found is None:
        found = any(
            relation.is_relation
            and isinstance(relation.related_model, type)
            and (issubclass(model, relation.related_model) or issubclass(relation.related_model, model))
            for relation in model._meta.get_fields()
        )
        _SELF_RELATED[model] = found
    return found


_SELF_RELATED: dict[type[Model], bool] = {}
