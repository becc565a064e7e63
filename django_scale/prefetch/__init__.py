"""Peer loading: when one row of a result set needs a relation, load it for all its peers.

A queryset built with :class:`~django_scale.querysets.PrefetchAwareQuerySetMixin` gives the
rows it returns one shared :class:`PeerGroup` (one pointer per row, on ``_state``). When code
then reads a relation of one row that nothing loaded yet, the relation is loaded for every
row of the group that lacks it, in one query per relation, and later rows answer from their
caches:

* forward foreign keys and one-to-one fields, and the reverse side of one-to-one fields:
  through Django 6.1's fetch-mode hook (:class:`PeerFetchMode`) on 6.1, and through the
  model state's field cache on Django 4.2 to 6.0;
* reverse foreign keys and many-to-many ``.all()``, and ``.count()`` / ``.exists()`` of
  their related managers: through
  :class:`~django_scale.querysets.PrefetchAwareManager`, the manager whose subclasses Django
  builds for related managers.

Nothing of Django is patched: the behaviour belongs to the rows of prefetch-aware querysets.

The same module detects the N+1 patterns that are left (a relation filtered or sliced per
row, a relation whose model is not prefetch-aware, peer loading turned off) and eager loads
that no row used; see :func:`detect_n_plus_one`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import django
from django.db import connections
from django.db.models import Count, F, Lookup, Model

from django_scale.conf import conf
from django_scale.exceptions import NPlusOneError, NPlusOneWarning, UnusedEagerLoadWarning

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

__all__ = [
    "AnyArray",
    "Detector",
    "PeerGroup",
    "attach_peers",
    "detect_n_plus_one",
    "filter_in",
    "peer_group",
]

logger = logging.getLogger("django_scale.prefetch")

#: Django 6.1 has fetch modes (``QuerySet.fetch_mode()``): peer loading builds on their hook.
HAS_FETCH_MODES = django.VERSION >= (6, 1)

Mode = Literal["off", "log", "warn", "raise"]
MODES: tuple[Mode, ...] = ("off", "log", "warn", "raise")


def _cache_name(relation: Any) -> str:
    """Return the key a relation caches under (``cache_name`` since Django 5.1)."""
    # Django 5.1 replaced get_cache_name() with the cache_name property and deprecated the
    # method; on 4.2 and 5.0 only the method exists.
    if hasattr(type(relation), "cache_name"):
        return str(relation.cache_name)
    return str(relation.get_cache_name())


# -- The group of peers ----------------------------------------------------------------------


class PeerGroup:
    """The rows one queryset evaluation (or one ``iterator()`` chunk) returned.

    Each row points at its group from its ``_state`` (its field cache on Django 4.2 to 6.0,
    its fetch mode on 6.1); the group holds the rows in the result list itself. That costs
    at most one pointer per row, where ``FETCH_PEERS`` keeps a weak reference per row.
    """

    __slots__ = (
        "alias",
        "batch",
        "children",
        "counts",
        "eager",
        "ids",
        "members",
        "mode",
        "model",
        "origin",
        "reported",
        "singles",
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
        #: Eager loads (select_related / prefetch_related) to check for use: name -> kind.
        self.eager: dict[str, str] = {}
        #: The eager loads some row used.
        self.used: set[str] = set()
        #: Per relation, the first row that loaded it on its own (N+1 detection).
        self.singles: dict[str, int] = {}
        #: The relations already reported as N+1, so each is reported once per group.
        self.reported: set[str] = set()
        #: Where the rows were loaded, for reports ("file:line").
        self.origin = ""

    def __reduce__(self) -> Any:
        # A pickled or copied row carries no peers (and never the whole result set).
        return (_no_group, ())

    def release(self) -> None:
        """Forget the rows (and rows loaded for them), so they are freed once the caller drops them."""
        self.members = []
        self.counts = {}
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
        if not _self_related(self.model):
            # Only rows of the model carry its group's mode, and only a relation from the
            # model to itself hands that mode to rows of the same model.
            return True
        if self.ids is None:
            self.ids = frozenset(map(id, self.members))
        return id(instance) in self.ids


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


def _self_related(model: type[Model]) -> bool:
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


class _PeerFieldsCache(dict[str, Any]):
    """A row's ``_state.fields_cache`` that loads a missing relation for all the row's peers.

    Used on Django 4.2 to 6.0, which have no fetch-mode hook: every lazy load of a forward
    foreign key or of a one-to-one field (either side) first looks in this cache.
    """

    __slots__ = ("group",)

    def __init__(self, group: PeerGroup | None, data: Iterable[tuple[str, Any]] = ()) -> None:
        super().__init__(data)
        self.group = group

    def __missing__(self, key: str) -> Any:
        group = self.group
        if group is None or len(group.members) < 2 or not _called_from_descriptor_get():
            raise KeyError(key)
        owner = next((row for row in group.members if row._state.fields_cache is self), None)
        if owner is None or not load_single(group, owner, key):
            raise KeyError(key)
        if key in self:
            return dict.get(self, key)
        raise KeyError(key)


class _TrackingFieldsCache(_PeerFieldsCache):
    """A :class:`_PeerFieldsCache` that records which eager loads (select_related) were read."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        group = self.group
        # Only a hit is a use: Django also looks up keys it is about to load.
        if group is not None and key in group.eager:
            group.used.add(key)
        return value


class _TrackingPrefetchCache(dict[str, Any]):
    """A row's ``_prefetched_objects_cache`` that records which prefetched relations were read."""

    __slots__ = ("group",)

    def __init__(self, group: PeerGroup) -> None:
        super().__init__()
        self.group = group

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if key in self.group.eager:
            self.group.used.add(key)
        return value


def _called_from_descriptor_get() -> bool:
    """Whether the missing cache key was asked for by a relation descriptor's ``__get__``.

    ``field.get_cached_value(instance, default=None)`` is also how Django *peeks* at the cache
    (when a relation is assigned ``None``, or before a save): a peek must not load anything.
    The frames are: ``__missing__`` (and this module's) <- ``get_cached_value`` <- the
    descriptor method.
    """
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None or frame.f_code.co_name != "get_cached_value" or frame.f_back is None:
        return False
    return frame.f_back.f_code.co_name == "__get__"


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
                cache_name = _cache_name(relation)
                if (
                    not load_single(group, instance, cache_name)
                    or cache_name not in instance._state.fields_cache
                ):
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
    return mode is _fetch_one() or isinstance(mode, PeerFetchMode)


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
    # Django 4.2 to 6.0 only look in the field cache before a lazy load, so each row's field
    # cache becomes one that loads for all peers and points at the group: 8 bytes more than
    # the dict Django gives every row. Django 6.1 asks the rows' fetch mode instead: a
    # per-group mode replaces the one every row already has, which costs nothing.
    cache_class = _TrackingFieldsCache if eager else (None if HAS_FETCH_MODES else _PeerFieldsCache)
    mode = None
    if HAS_FETCH_MODES:
        mode = group.mode = PeerFetchMode(group)
        fetch_one = _fetch_one()
    for row in instances:
        state = row._state
        if cache_class is not None:
            state.fields_cache = cache_class(group, state.fields_cache.items())
        if mode is not None:
            current = state.fetch_mode
            if current is fetch_one or isinstance(current, PeerFetchMode):
                state.fetch_mode = mode
    return group


# -- Loading a relation for all peers -------------------------------------------------------


class AnyArray(Lookup):
    """``column = ANY(%s::type[])``: one statement shape for any number of values (PostgreSQL)."""

    lookup_name = "django_scale_any"
    prepare_rhs = False

    def get_prep_lookup(self) -> Any:
        return self.rhs

    def as_sql(self, compiler: Any, connection: BaseDatabaseWrapper) -> Any:
        lhs_sql, lhs_params = self.process_lhs(compiler, connection)
        target = self.lhs.output_field
        values = [target.get_db_prep_value(value, connection, prepared=False) for value in self.rhs]
        db_type = target.rel_db_type(connection) if target.is_relation else target.db_type(connection)
        return f"{lhs_sql} = ANY(%s::{db_type}[])", [*lhs_params, values]


def _parameter_limit(connection: BaseDatabaseWrapper) -> int:
    """How many values one ``IN (...)`` may carry on *connection*, leaving room for others."""
    limit: int | None = None
    if connection.vendor == "sqlite":
        import sqlite3

        connection.ensure_connection()
        getlimit = getattr(connection.connection, "getlimit", None)  # Python 3.11+
        if getlimit is not None:
            limit = int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    if limit is None:
        limit = connection.features.max_query_params or 2000
    # Room for the other parameters of the query (default-manager filters and the like).
    return max(1, min(limit - 100, 10_000) if limit > 200 else limit // 2)


def filter_in(queryset: QuerySet[Any], name: str, values: Sequence[Any]) -> list[QuerySet[Any]]:
    """Return querysets that together select the rows of *queryset* whose *name* is in *values*.

    PostgreSQL gets one query, ``name = ANY(array)``, whatever the number of values; other
    databases get ``IN (...)`` queries in chunks under their parameter limit.
    """
    connection = connections[queryset.db]
    if connection.vendor == "postgresql":
        return [queryset.filter(AnyArray(F(name), list(values)))]
    size = _parameter_limit(connection)
    return [queryset.filter(**{f"{name}__in": values[i : i + size]}) for i in range(0, len(values), size)]


def _single_relations(model: type[Model]) -> dict[str, Any]:
    """Map each cache name of *model*'s single-valued relations to the relation."""
    found = _SINGLE_RELATIONS.get(model)
    if found is None:
        found = {}
        for relation in model._meta.get_fields():
            if not relation.is_relation or not (relation.many_to_one or relation.one_to_one):
                continue
            if relation.concrete or relation.one_to_one:
                found[_cache_name(relation)] = relation
        _SINGLE_RELATIONS[model] = found
    return found


_SINGLE_RELATIONS: dict[type[Model], dict[str, Any]] = {}


def load_single(group: PeerGroup, instance: Model, cache_name: str) -> bool:
    """Load the single-valued relation *cache_name* for every peer of *instance* lacking it.

    Return whether it was loaded (``False``: the caller loads *instance*'s alone).
    """
    model = type(instance)
    relation = _single_relations(model).get(cache_name)
    label = f"{model.__name__}.{cache_name}"
    if relation is None or not group.batch:
        note_single(group, label, instance)
        return False
    members = [
        row for row in group.members if type(row) is model and cache_name not in row._state.fields_cache
    ]
    if relation.concrete:
        return _load_forward(group, relation, members)
    return _load_reverse_one(group, relation, members)


def _load_forward(group: PeerGroup, fk: Any, members: list[Model]) -> bool:
    """Load a forward foreign key or one-to-one field for *members* in one query."""
    if len(fk.foreign_related_fields) != 1:
        return False  # a composite key: Django loads it row by row
    target = fk.foreign_related_fields[0].attname
    pending: list[tuple[Model, Any]] = []
    for row in members:
        if fk.attname not in row.__dict__:
            continue  # deferred: loading the key would be a query of its own
        value = row.__dict__[fk.attname]
        if value is None:
            fk.set_cached_value(row, None)
        else:
            pending.append((row, value))
    if not pending:
        return True
    queryset = fk.remote_field.model._base_manager.db_manager(group.alias).all()
    found: dict[Any, Model] = {}
    for part in filter_in(queryset, target, list({value for _, value in pending})):
        for obj in part:
            found[getattr(obj, target)] = obj
    one_to_one = not fk.remote_field.multiple
    for row, value in pending:
        obj = found.get(value)
        if obj is None:
            continue  # a dangling key: Django's own lookup raises DoesNotExist
        fk.set_cached_value(row, obj)
        if one_to_one:
            fk.remote_field.set_cached_value(obj, row)
    attach_peers(list(found.values()), group.alias, parent=group)
    return True


def _load_reverse_one(group: PeerGroup, related: Any, members: list[Model]) -> bool:
    """Load the reverse side of a one-to-one field for *members* in one query."""
    fk = related.field
    if len(fk.foreign_related_fields) != 1:
        return False
    key = fk.foreign_related_fields[0].attname
    keys = {row.__dict__.get(key) for row in members} - {None}
    queryset = related.related_model._base_manager.db_manager(group.alias).all()
    found: dict[Any, Model] = {}
    for part in filter_in(queryset, fk.attname, list(keys)):
        for obj in part:
            found[getattr(obj, fk.attname)] = obj
    for row in members:
        obj = found.get(row.__dict__.get(key))
        # None is cached as Django caches it: the descriptor raises RelatedObjectDoesNotExist.
        related.set_cached_value(row, obj)
        if obj is not None:
            fk.set_cached_value(obj, row)
    attach_peers(list(found.values()), group.alias, parent=group)
    return True


# -- Related managers (reverse foreign keys and many-to-many) --------------------------------


@dataclass(frozen=True)
class ManyRelation:
    """What peer loading needs to know about one related manager class."""

    #: "Article.comments": the model and accessor, for reports.
    label: str
    #: The key of the relation in ``instance._prefetched_objects_cache``.
    cache_name: str
    #: The lookup (on the related model) that holds the parent's key.
    key_lookup: str
    #: The foreign key whose reverse cache to fill on loaded rows (reverse FK only).
    reverse_fk: Any
    #: The attribute of the parent that holds the key.
    parent_attname: str


def many_relation(manager: Any) -> ManyRelation | None:
    """Describe the related manager *manager* (``article.comments``), or ``None`` if unknown."""
    manager_class = type(manager)
    known = manager_class.__dict__.get("_django_scale_relation", False)
    if known is not False:
        return known  # type: ignore[no-any-return]
    relation: ManyRelation | None = None
    instance = manager.instance
    if hasattr(manager, "through") and hasattr(manager, "source_field"):
        pairs = manager.source_field.related_fields
        if len(pairs) == 1:
            rh_field = pairs[0][1]
            relation = ManyRelation(
                label=f"{type(instance).__name__}.{manager.prefetch_cache_name}",
                cache_name=manager.prefetch_cache_name,
                key_lookup=f"{manager.query_field_name}__{rh_field.name}",
                reverse_fk=None,
                parent_attname=rh_field.attname,
            )
    elif hasattr(manager, "field") and hasattr(manager, "core_filters") and manager.field.many_to_one:
        fk = manager.field
        if len(fk.foreign_related_fields) == 1:
            cache_name = _cache_name(fk.remote_field)
            relation = ManyRelation(
                label=f"{type(instance).__name__}.{cache_name}",
                cache_name=cache_name,
                key_lookup=fk.attname,
                reverse_fk=fk,
                parent_attname=fk.foreign_related_fields[0].attname,
            )
    manager_class._django_scale_relation = relation
    return relation


def base_queryset(manager: Any) -> QuerySet[Any]:
    """Return the related model's queryset behind *manager*, before its per-row filter."""
    queryset: QuerySet[Any] = super(type(manager), manager).get_queryset()
    return queryset


def load_many(manager: Any, group: PeerGroup) -> bool:
    """Load ``manager.all()`` for every peer of ``manager.instance`` lacking it, in one query.

    Each peer gets the rows as if ``prefetch_related`` had loaded them. Return whether the
    relation was loaded.
    """
    relation = many_relation(manager)
    if relation is None:
        return False
    instance = manager.instance
    model = type(instance)
    members = [
        row
        for row in group.members
        if type(row) is model
        and relation.cache_name not in row.__dict__.get("_prefetched_objects_cache", ())
        and row.__dict__.get(relation.parent_attname) is not None
    ]
    template = base_queryset(manager).using(group.alias)
    keyed = template.annotate(_django_scale_key=F(relation.key_lookup))
    rows: dict[Any, list[Model]] = defaultdict(list)
    keys = list({row.__dict__[relation.parent_attname] for row in members})
    loaded: list[Model] = []
    for part in filter_in(keyed, "_django_scale_key", keys):
        for obj in part:
            rows[obj.__dict__.pop("_django_scale_key")].append(obj)
            loaded.append(obj)
    manager_class = type(manager)
    fk = relation.reverse_fk
    for row in members:
        values = rows.get(row.__dict__[relation.parent_attname], [])
        if fk is not None:
            for obj in values:
                fk.set_cached_value(obj, row)
        queryset = manager_class(row)._apply_rel_filters(template._chain())  # type: ignore[attr-defined]
        queryset._result_cache = values
        queryset._prefetch_done = True
        cache = row.__dict__.get("_prefetched_objects_cache")
        if cache is None:
            cache = row.__dict__["_prefetched_objects_cache"] = {}
        cache[relation.cache_name] = queryset
    attach_peers(loaded, group.alias, parent=group)
    return True


def count_many(manager: Any, group: PeerGroup) -> int | None:
    """Return ``manager.count()`` from one grouped ``COUNT`` over all peers, or ``None``.

    ``None`` means the count cannot be grouped (an unusual related queryset); the caller
    counts this row alone.
    """
    relation = many_relation(manager)
    if relation is None:
        return None
    key = manager.instance.__dict__.get(relation.parent_attname)
    if key is None:
        return None
    counts = group.counts.get(relation.cache_name)
    if counts is None:
        template = base_queryset(manager)
        query = template.query
        if query.distinct or query.is_sliced or query.combinator:
            return None
        model = type(manager.instance)
        keys = list(
            {
                row.__dict__[relation.parent_attname]
                for row in group.members
                if type(row) is model and row.__dict__.get(relation.parent_attname) is not None
            }
        )
        keyed = template.using(group.alias).annotate(_django_scale_key=F(relation.key_lookup))
        counts = {}
        for part in filter_in(keyed, "_django_scale_key", keys):
            grouped = part.order_by().values("_django_scale_key").annotate(_django_scale_n=Count("pk"))
            for item in grouped:
                counts[item["_django_scale_key"]] = item["_django_scale_n"]
        group.counts[relation.cache_name] = counts
    return counts.get(key, 0)


# -- N+1 detection ---------------------------------------------------------------------------


@dataclass
class Detector:
    """One scope of N+1 detection: how to report, and the result sets loaded inside it."""

    #: "raise" (tests), "warn", "log" or "off".
    mode: Mode
    #: The share of findings logged in "log" mode (sampling for production).
    sample_rate: float = 1.0
    #: Whether eager loads no row used are reported when the scope ends.
    unused_eager: bool = True
    #: The result sets with eager loads to check when the scope ends.
    groups: list[PeerGroup] = field(default_factory=list)
    #: What was reported (messages), for tests and tooling.
    findings: list[str] = field(default_factory=list)


_detector: contextvars.ContextVar[Detector | None] = contextvars.ContextVar(
    "django_scale_detector", default=None
)


def current_detector() -> Detector | None:
    """Return the detection scope in effect: the innermost :func:`detect_n_plus_one`, else the setting."""
    detector = _detector.get()
    if detector is not None:
        return detector if detector.mode != "off" else None
    mode = conf.N_PLUS_ONE
    if mode == "off":
        return None
    return Detector(mode=mode, sample_rate=conf.N_PLUS_ONE_SAMPLE_RATE, unused_eager=False)


@contextmanager
def detect_n_plus_one(
    mode: Mode = "raise", *, sample_rate: float = 1.0, unused_eager: bool = True
) -> Iterator[Detector]:
    """Detect N+1 queries and unused eager loads in the block; report them by *mode*.

    *mode* is ``"raise"`` (:exc:`~django_scale.exceptions.NPlusOneError`), ``"warn"``
    (:class:`~django_scale.exceptions.NPlusOneWarning`), ``"log"`` (logger
    ``django_scale.prefetch``, a *sample_rate* share of findings) or ``"off"``. An N+1 is a
    relation loaded row by row for a second row of one result set; a single object never
    is one. With *unused_eager*, eager loads (``select_related``, ``prefetch_related``
    without ``to_attr``) of result sets loaded in the block that no row read are reported
    when the block ends.
    """
    if mode not in MODES:
        raise ValueError(f"detect_n_plus_one(mode={mode!r}): mode must be one of {', '.join(MODES)}.")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"detect_n_plus_one(sample_rate={sample_rate!r}): it must be between 0 and 1.")
    detector = Detector(mode=mode, sample_rate=sample_rate, unused_eager=unused_eager)
    token = _detector.set(detector)
    try:
        yield detector
    finally:
        _detector.reset(token)
    if unused_eager and mode != "off":
        for group in detector.groups:
            for name in sorted(set(group.eager) - group.used):
                kind = group.eager[name]
                model = type(group.members[0]).__name__ if group.members else "?"
                _report(
                    detector,
                    f"Unused eager load: {kind}({name!r}) on {model} rows loaded at {group.origin}, "
                    f"and no row read {model}.{name}. Remove it from the queryset.",
                    UnusedEagerLoadWarning,
                )


def track_eager(queryset: QuerySet[Any]) -> dict[str, str] | None:
    """Return the eager loads of *queryset* to check for use, if a detection scope wants them."""
    detector = _detector.get()
    if detector is None or detector.mode == "off" or not detector.unused_eager:
        return None
    eager: dict[str, str] = {}
    select_related = queryset.query.select_related
    if isinstance(select_related, dict):
        eager.update(dict.fromkeys(select_related, "select_related"))
    for lookup in queryset._prefetch_related_lookups:  # type: ignore[attr-defined]
        if getattr(lookup, "to_attr", None):
            continue  # a plain attribute: its reads cannot be seen
        through = getattr(lookup, "prefetch_through", lookup)
        eager.setdefault(str(through).split("__")[0], "prefetch_related")
    return eager or None


def watch(group: PeerGroup) -> None:
    """Register *group* with the current detection scope, to report its unused eager loads."""
    detector = _detector.get()
    if detector is not None:
        group.origin = caller_location()
        detector.groups.append(group)


def note_single(group: PeerGroup | None, label: str, instance: Model) -> None:
    """Record that *instance* loaded *label* on its own; report an N+1 at the second peer doing so."""
    if group is None or len(group.members) < 2 or label in group.reported:
        return
    first = group.singles.setdefault(label, id(instance))
    if first == id(instance):
        return
    detector = current_detector()
    if detector is None:
        return
    group.reported.add(label)
    _report(
        detector,
        f"N+1 query: {label} was loaded row by row for the rows of one result set "
        f"({len(group.members)} rows), at {caller_location()}. Let the whole set load it at once: "
        "use a prefetch-aware queryset for the related model, or prefetch_related() with a "
        "Prefetch() queryset instead of filtering or slicing per row.",
        NPlusOneWarning,
    )


def _report(detector: Detector, message: str, category: type[Warning]) -> None:
    detector.findings.append(message)
    if detector.mode == "raise":
        raise NPlusOneError(message)
    if detector.mode == "warn":
        warnings.warn(message, category, stacklevel=_user_stacklevel())
    elif detector.mode == "log" and (detector.sample_rate >= 1 or random.random() < detector.sample_rate):
        logger.warning(message)


_DJANGO_DIR = os.path.dirname(django.__file__) + os.sep
_OWN_DIR = os.path.dirname(__file__) + os.sep
_MANAGER_FILE = os.path.join(_DJANGO_DIR, "db", "models", "manager.py")


def _is_library(filename: str) -> bool:
    return filename.startswith((_DJANGO_DIR, _OWN_DIR)) or filename.endswith(
        ("contextlib.py", "functools.py")
    )


def _user_frame() -> FrameType | None:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def caller_location() -> str:
    """Return "file:line" of the innermost caller outside Django and django-scale."""
    frame = _user_frame()
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` that points at the user's line."""
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def called_by_django() -> bool:
    """Whether the current queryset call comes from Django's own code (not the user's).

    Frames of Django's manager proxies are skipped: ``article.comments.filter()`` is the
    user's call even though ``Manager.filter`` forwards it.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_OWN_DIR) or frame.f_code.co_filename == _MANAGER_FILE
    ):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_DJANGO_DIR)
