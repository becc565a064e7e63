"""Loaders: one relation for all the peers of a row, in one query (or one per chunk).

The loaders fill the relation caches of the peers and return the rows they loaded; the
caller makes those rows peers of each other (:func:`django_scale.prefetch.attach_peers`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.db.models import Count, F, Lookup, Model

from django_scale.prefetch.detection import note_single
from django_scale.prefetch.peers import PeerGroup, cache_name, remember

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

__all__ = [
    "AnyArray",
    "ManyRelation",
    "base_queryset",
    "count_many",
    "filter_in",
    "load_many",
    "load_single",
    "many_relation",
    "on_ancestor",
    "plain",
    "rows_for",
]


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


# -- Single-valued relations: forward foreign keys and one-to-one fields (both sides) --------


def _single_relations(model: type[Model]) -> dict[str, Any]:
    """Map each cache name of *model*'s single-valued relations to the relation.

    Multi-table inheritance parent links (``restaurant.place_ptr``) are left out: Django
    builds the parent from the child's own values without a query.
    """
    found = _SINGLE_RELATIONS.get(model)
    if found is None:
        found = {}
        for relation in model._meta.get_fields():
            if not relation.is_relation or not (relation.many_to_one or relation.one_to_one):
                continue
            if relation.concrete and getattr(relation.remote_field, "parent_link", False):
                continue
            if relation.concrete or relation.one_to_one:
                found[cache_name(relation)] = relation
        _SINGLE_RELATIONS[model] = found
    return found


_SINGLE_RELATIONS: dict[type[Model], dict[str, Any]] = {}


def on_ancestor(instance: Model, fk: Any) -> bool:
    """Whether the forward key *fk* of a parent model is already cached on *instance*'s parent.

    Django's ``ForwardManyToOneDescriptor.__get__`` reads it from there without a query
    (an instance reached through ``select_related`` down the inheritance chain).
    """
    if fk.model is type(instance) or not isinstance(instance, fk.model):
        return False
    link = instance._meta.get_ancestor_link(fk.model)
    if link is None or not link.is_cached(instance):
        return False
    ancestor = link.get_cached_value(instance)
    return ancestor is not None and fk.get_cached_value(ancestor, default=None) is not None


def load_single(group: PeerGroup, instance: Model, name: str) -> list[Model] | None:
    """Load the single-valued relation cached as *name* for every peer of *instance* lacking it.

    Return the rows loaded, or ``None`` when nothing was (the caller loads *instance*'s
    alone).
    """
    model = type(instance)
    relation = _single_relations(model).get(name)
    label = f"{model.__name__}.{name}"
    if relation is None:
        return None
    if not group.batch:
        note_single(group, label, instance)
        return None
    if relation.concrete and on_ancestor(instance, relation):
        return None
    members = [row for row in group.members if type(row) is model and not relation.is_cached(row)]
    if relation.concrete:
        return _load_forward(group, relation, [row for row in members if not on_ancestor(row, relation)])
    return _load_reverse_one(group, relation, members)


def _load_forward(group: PeerGroup, fk: Any, members: list[Model]) -> list[Model] | None:
    """Load a forward foreign key or one-to-one field for *members* in one query."""
    if len(fk.foreign_related_fields) != 1:
        return None  # a composite key: Django loads it row by row
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
        return []
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
    return list(found.values())


def _load_reverse_one(group: PeerGroup, related: Any, members: list[Model]) -> list[Model] | None:
    """Load the reverse side of a one-to-one field for *members* in one query."""
    fk = related.field
    if len(fk.foreign_related_fields) != 1:
        return None
    key = fk.foreign_related_fields[0].attname
    keys = {row.__dict__.get(key) for row in members} - {None}
    queryset = related.related_model._base_manager.db_manager(group.alias).all()
    found: dict[Any, Model] = {}
    for part in filter_in(queryset, fk.attname, list(keys)):
        for obj in part:
            found[getattr(obj, fk.attname)] = obj
    given: set[Any] = set()
    for row in members:
        value = row.__dict__.get(key)
        obj = found.get(value)
        if obj is not None and value in given:
            obj = copy.copy(obj)  # another instance of the same row: its own back-reference
        given.add(value)
        # None is cached as Django caches it: the descriptor raises RelatedObjectDoesNotExist.
        related.set_cached_value(row, obj)
        if obj is not None:
            fk.set_cached_value(obj, row)
    # A row created later for a peer cached as missing must be seen: see invalidation.
    remember(group)
    return list(found.values())


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
            name = cache_name(fk.remote_field)
            relation = ManyRelation(
                label=f"{type(instance).__name__}.{name}",
                cache_name=name,
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


def plain(queryset: QuerySet[Any]) -> bool:
    """Whether *queryset* selects every row of its model, as a plain ``Manager``'s does."""
    query = queryset.query
    return not (query.where or query.distinct or query.is_sliced or query.combinator or query.extra)


def load_many(manager: Any, group: PeerGroup) -> dict[Any, list[Model]] | None:
    """Load ``manager.all()`` for every peer of ``manager.instance``, in one query.

    The rows are kept in the group (``group.many``), by the key of the peer they belong
    to; each reverse foreign key row points back at its own peer, as Django's lazy
    loading does. Return the rows by key, or ``None`` when the relation cannot be loaded
    so.
    """
    relation = many_relation(manager)
    if relation is None:
        return None
    loaded = group.many.get(relation.cache_name)
    if loaded is not None:
        return loaded
    model = type(manager.instance)
    members = [
        row
        for row in group.members
        if type(row) is model and row.__dict__.get(relation.parent_attname) is not None
    ]
    template = base_queryset(manager).using(group.alias)
    keyed = template.annotate(_django_scale_key=F(relation.key_lookup))
    rows: dict[Any, list[Model]] = defaultdict(list)
    keys = list({row.__dict__[relation.parent_attname] for row in members})
    for part in filter_in(keyed, "_django_scale_key", keys):
        for obj in part:
            rows[obj.__dict__.pop("_django_scale_key")].append(obj)
    fk = relation.reverse_fk
    if fk is not None:
        for row in members:
            for obj in rows.get(row.__dict__[relation.parent_attname], ()):
                if not fk.is_cached(obj):
                    fk.set_cached_value(obj, row)
    loaded = dict(rows)
    group.record_states()
    group.many[relation.cache_name] = loaded
    remember(group)
    return loaded


def rows_for(manager: Any, loaded: dict[Any, list[Model]]) -> list[Model]:
    """Return the rows of ``manager.instance`` from *loaded*, pointing back at that instance.

    Two instances of one row (``select_related`` joins one per row) each get rows of their
    own, as Django's lazy loading gives them.
    """
    relation = many_relation(manager)
    assert relation is not None
    instance = manager.instance
    rows = loaded.get(instance.__dict__.get(relation.parent_attname), [])
    fk = relation.reverse_fk
    if fk is not None and rows and fk.get_cached_value(rows[0], default=None) is not instance:
        rows = [copy.copy(obj) for obj in rows]
        for obj in rows:
            fk.set_cached_value(obj, instance)
    return rows


def _through_counts(manager: Any, group: PeerGroup, keys: list[Any]) -> dict[Any, int] | None:
    """Count a many-to-many relation on its through table alone, as Django 5.0+ does for one row.

    ``ManyRelatedManager.count()`` skips the join to the target table when the through
    table's key to it is enforced by the database (``constrained_target``); the grouped
    count does the same, so it reads no more than Django's.
    """
    target = getattr(manager, "target_field", None)
    if target is None or not target.db_constraint or not plain(base_queryset(manager)):
        return None
    if not connections[group.alias].features.supports_foreign_keys:
        return None
    source = manager.source_field
    if len(source.foreign_related_fields) != 1:
        return None
    queryset = manager.through._base_manager.db_manager(group.alias).all()
    if target.null:
        queryset = queryset.filter(**{f"{manager.target_field_name}__isnull": False})
    counts: dict[Any, int] = {}
    for part in filter_in(queryset, source.attname, keys):
        grouped = part.order_by().values(source.attname).annotate(_django_scale_n=Count("pk"))
        for item in grouped:
            counts[item[source.attname]] = item["_django_scale_n"]
    return counts


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
    loaded = group.many.get(relation.cache_name)
    if loaded is not None:
        return len(loaded.get(key, ()))
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
        counts = _through_counts(manager, group, keys) if relation.reverse_fk is None else None
        if counts is None:
            keyed = template.using(group.alias).annotate(_django_scale_key=F(relation.key_lookup))
            counts = {}
            for part in filter_in(keyed, "_django_scale_key", keys):
                grouped = part.order_by().values("_django_scale_key").annotate(_django_scale_n=Count("pk"))
                for item in grouped:
                    counts[item["_django_scale_key"]] = item["_django_scale_n"]
        group.record_states()
        group.counts[relation.cache_name] = counts
        remember(group)
    return counts.get(key, 0)
