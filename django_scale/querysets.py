"""Queryset mixins for big tables: ``ScaleQuerySet`` and its parts."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.db.models.query import ModelIterable, prefetch_related_objects

from django_scale.cache.queries import CacheOptions, fetch_rows
from django_scale.counting import DEFAULT_BUDGET, DEFAULT_CAP, DEFAULT_THRESHOLD, ApproxCount, approx_count
from django_scale.exceptions import PrefetchBypassedWarning
from django_scale.prefetch import detection, hooks, invalidation, loaders, peers, plain

__all__ = [
    "ApproxCountQuerySetMixin",
    "CachedQuerySetMixin",
    "PrefetchAwareManager",
    "PrefetchAwareQuerySetMixin",
    "ScaleQuerySet",
]

if TYPE_CHECKING:
    _QuerySetBase = models.QuerySet[Any]
    _ManagerBase = models.Manager[Any]
else:
    _QuerySetBase = object
    _ManagerBase = models.Manager


class ApproxCountQuerySetMixin:
    """Add ``approx_count()`` to a ``QuerySet`` subclass."""

    def approx_count(
        self,
        *,
        threshold: int = DEFAULT_THRESHOLD,
        cap: int = DEFAULT_CAP,
        budget: float = DEFAULT_BUDGET,
        statistics: bool = True,
    ) -> ApproxCount:
        """Return the number of rows: exact below *threshold*, else estimated or capped.

        See :func:`django_scale.counting.approx_count`.
        """
        queryset: Any = self
        return approx_count(queryset, threshold=threshold, cap=cap, budget=budget, statistics=statistics)


class PrefetchAwareQuerySetMixin(_QuerySetBase):
    """Load a relation for all rows of a result set when one row first needs it.

    Mix it into a ``QuerySet`` subclass and build the model's manager with
    :meth:`as_manager` (or :class:`PrefetchAwareManager` ``.from_queryset()``)::

        class ArticleQuerySet(PrefetchAwareQuerySetMixin, models.QuerySet):
            pass

        class Article(models.Model):
            objects = ArticleQuerySet.as_manager()

    For the rows it returns, a forward foreign key or one-to-one field read on one row is
    loaded for all of them in one query; so are reverse foreign keys and many-to-many
    ``.all()``, ``.count()`` and ``.exists()`` of related managers, whether the related
    model's manager is prefetch-aware too or Django's (:mod:`~django_scale.prefetch.plain`). ``iterator(chunk_size)`` makes each chunk a set of peers. A single
    object (``get()``) has no peers, and a sliced or filtered relation is never batched.
    """

    #: Whether lazy loads of this queryset's rows are batched over their peers.
    _django_scale_batch: bool = True
    #: For a related manager's queryset: "Model.relation", for N+1 reports.
    _django_scale_related: str | None = None

    @classmethod
    def as_manager(cls) -> Any:
        """Return a :class:`PrefetchAwareManager` with this queryset's methods."""
        manager: Any = PrefetchAwareManager.from_queryset(cls)()
        manager._built_with_as_manager = True
        return manager

    as_manager.queryset_only = True  # type: ignore[attr-defined]

    def peer_loading(self, enabled: bool = True) -> Any:
        """Return a copy whose rows load relations together (``True``) or one by one.

        With ``False`` the rows behave as Django's, and :func:`~django_scale.prefetch.detect_n_plus_one`
        reports the N+1 queries they make.
        """
        clone: Any = self._chain()  # type: ignore[attr-defined]
        clone._django_scale_batch = bool(enabled)
        return clone

    def _clone(self) -> Any:
        clone: Any = super()._clone()  # type: ignore[misc]
        values = self.__dict__
        if "_django_scale_batch" in values:
            clone._django_scale_batch = values["_django_scale_batch"]
        if "_django_scale_related" in values:
            clone._django_scale_related = values["_django_scale_related"]
        return clone

    def _django_scale_tracks(self) -> bool:
        """Whether this queryset's rows get peers: model rows, in Django's default fetch mode."""
        if not issubclass(self._iterable_class, ModelIterable):
            return False
        if peers.HAS_FETCH_MODES:
            return hooks.is_default_mode(self._fetch_mode)  # type: ignore[attr-defined,unused-ignore]
        return True

    def _fetch_all(self) -> None:
        if self._result_cache is None:
            load: plain.PeerLoad | None = self.__dict__.pop("_django_scale_peer_load", None)
            rows = load.rows() if load is not None else None
            if rows is not None:
                self._result_cache = rows
                self._django_scale_peer_rows = True
            else:
                self._django_scale_evaluate()
        super()._fetch_all()

    def _django_scale_evaluate(self) -> None:
        queryset: Any = self
        rows = self._django_scale_rows()
        self._result_cache = rows
        self._django_scale_note_single()
        if len(rows) < 2 or not self._django_scale_tracks():
            return
        # Rows joined in by select_related are peers too: author.profile loads for all authors.
        # They are read before the rows' field caches track reads (unused eager loads).
        joined: list[list[Any]] = []
        if isinstance(self.query.select_related, dict):
            for name in self.query.select_related:
                try:
                    relation: Any = self.model._meta.get_field(name)
                except FieldDoesNotExist:
                    continue
                found = {
                    id(obj): obj
                    for row in rows
                    if (obj := relation.get_cached_value(row, default=None)) is not None
                }
                joined.append(list(found.values()))
        eager = detection.track_eager(self)
        group = hooks.attach_peers(rows, rows[0]._state.db, batch=self._django_scale_batch, eager=eager)
        if group is not None:
            plain.install(group)
            for objects in joined:
                child = hooks.attach_peers(objects, group.alias, batch=group.batch, parent=group)
                if child is not None:
                    plain.install(child)
        if group is not None and eager:
            if queryset._prefetch_related_lookups and not queryset._prefetch_done:
                for row in rows:
                    if "_prefetched_objects_cache" not in row.__dict__:
                        row._prefetched_objects_cache = hooks.TrackingPrefetchCache(group)
            detection.watch(group)

    def _django_scale_rows(self) -> list[Any]:
        """Run the query and return its rows (:class:`CachedQuerySetMixin` may serve them instead).

        Through the ``_fetch_all()`` of the classes after this one, Django's last: a queryset
        class of the project's or a package's between this mixin and ``QuerySet`` (or a
        package that wraps ``QuerySet._fetch_all``, as django-cacheops does) still loads or
        serves the rows, as it would without the mixin. The prefetch lookups are set aside
        meanwhile: the rows get their peers before ``prefetch_related()`` runs on them (the
        ``_fetch_all()`` that follows runs it).
        """
        queryset: Any = self
        lookups = queryset._prefetch_related_lookups
        queryset._prefetch_related_lookups = ()
        try:
            super()._fetch_all()
        finally:
            queryset._prefetch_related_lookups = lookups
        rows: list[Any] = queryset._result_cache
        return rows

    def _django_scale_note_single(self) -> None:
        """Record a related manager's query for one row (N+1 detection)."""
        label = self.__dict__.get("_django_scale_related")
        if label is not None:
            instance = self._hints.get("instance")  # type: ignore[attr-defined]
            if instance is not None:
                detection.note_single(peers.peer_group(instance), label, instance)

    def _iterator(self, use_chunked_fetch: bool, chunk_size: int | None) -> Iterator[Any]:
        if not self._django_scale_tracks():
            yield from super()._iterator(use_chunked_fetch, chunk_size)  # type: ignore[misc]
            return
        queryset: Any = self
        size = chunk_size or 2000
        iterator = iter(queryset._iterable_class(queryset, chunked_fetch=use_chunked_fetch, chunk_size=size))
        # Each chunk is a set of peers. Its group is released when the next chunk starts, so
        # rows the caller dropped are freed at once and memory stays flat.
        while results := list(islice(iterator, size)):
            if queryset._prefetch_related_lookups and chunk_size is not None:
                prefetch_related_objects(results, *queryset._prefetch_related_lookups)
            group = hooks.attach_peers(results, results[0]._state.db, batch=self._django_scale_batch)
            if group is not None:
                plain.install(group)
            try:
                yield from results
            finally:
                if group is not None:
                    group.release()
            del results

    # -- answers from the prefetch cache ------------------------------------------------------

    def count(self) -> int:
        load: plain.PeerLoad | None = self.__dict__.get("_django_scale_peer_load")
        if load is not None and self._result_cache is None:
            counted = load.count()
            if counted is not None:
                return counted
        if self._result_cache is None:
            self._django_scale_note_single()
        return super().count()

    def exists(self) -> bool:
        load: plain.PeerLoad | None = self.__dict__.get("_django_scale_peer_load")
        if load is not None and self._result_cache is None:
            counted = load.count()
            if counted is not None:
                return counted > 0
        if self._result_cache is None:
            self._django_scale_note_single()
        return super().exists()

    def _django_scale_loaded_by_peers(self) -> list[Any] | None:
        """The rows of a related manager's ``all()`` that peer loading loaded (loading them now).

        Only those answer ``first()`` and ``last()`` without a query: any other queryset,
        evaluated or not, answers as Django's does.
        """
        if self._result_cache is None and "_django_scale_peer_load" in self.__dict__:
            self._fetch_all()
        if not self.__dict__.get("_django_scale_peer_rows"):
            return None
        return self._result_cache

    def _django_scale_end(self, rows: list[Any], last: bool) -> Any:
        """``first()`` (or ``last()``) of *rows*, as Django's query would order them."""
        if not rows:
            return None
        backwards = last == self.query.standard_ordering
        if self.ordered:
            return rows[-1] if last else rows[0]
        # Django orders an unordered queryset by the primary key ("-pk" for last(), and
        # the other way round after reverse()).
        return (max if backwards else min)(rows, key=lambda row: row.pk)

    def first(self) -> Any:
        """Return the first row; from the rows peer loading loaded for a related manager."""
        rows = self._django_scale_loaded_by_peers()
        if rows is None:
            return super().first()
        return self._django_scale_end(rows, last=False)

    def last(self) -> Any:
        """Return the last row; from the rows peer loading loaded for a related manager."""
        rows = self._django_scale_loaded_by_peers()
        if rows is None:
            return super().last()
        return self._django_scale_end(rows, last=True)

    # -- writes drop what peers cached ------------------------------------------------------

    def update(self, **kwargs: Any) -> int:
        updated = int(super().update(**kwargs))
        invalidation.model_written(self.model)
        return updated

    def delete(self) -> tuple[int, dict[str, int]]:
        deleted: tuple[int, dict[str, int]] = super().delete()
        invalidation.model_written(self.model)
        return deleted

    def bulk_create(self, objs: Any, *args: Any, **kwargs: Any) -> list[Any]:
        created: list[Any] = super().bulk_create(objs, *args, **kwargs)
        invalidation.model_written(self.model)
        return created

    def bulk_update(self, objs: Any, fields: Any, *args: Any, **kwargs: Any) -> int:
        updated = int(super().bulk_update(objs, fields, *args, **kwargs))
        invalidation.model_written(self.model)
        return updated

    # -- prefetch bypassed -------------------------------------------------------------------

    def _django_scale_warn_bypass(self, method: str) -> None:
        queryset: Any = self
        if not (queryset._prefetch_done and self._result_cache is not None):
            return
        instance = queryset._hints.get("instance")
        label = f"{self._django_scale_related or self.model.__name__}.{method}()"
        # Warned at the second row of one result set doing it: a pattern that queries once per
        # row. One row doing it (or Django's own remove() filtering a prefetched relation) is not.
        if instance is not None and detection.repeated_by_peer(peers.peer_group(instance), label, instance):
            detection.warn_at_caller(
                f"{label} on a prefetched relation ignores the prefetched rows and queries the "
                "database again, once per row. Filter in memory, or prefetch the filtered rows "
                "with Prefetch(queryset=..., to_attr=...).",
                PrefetchBypassedWarning,
            )

    def filter(self, *args: Any, **kwargs: Any) -> Any:
        self._django_scale_warn_bypass("filter")
        return super().filter(*args, **kwargs)

    def exclude(self, *args: Any, **kwargs: Any) -> Any:
        self._django_scale_warn_bypass("exclude")
        return super().exclude(*args, **kwargs)

    def order_by(self, *field_names: Any) -> Any:
        self._django_scale_warn_bypass("order_by")
        return super().order_by(*field_names)


class PrefetchAwareManager(plain.LoadsForPeers, _ManagerBase):
    """The manager of prefetch-aware querysets, and the base of their related managers.

    Django builds ``article.comments`` and ``article.tags`` as subclasses of the related
    model's default manager, so when that manager is a ``PrefetchAwareManager`` its
    ``all()``, ``count()`` and ``exists()`` answer for all peers of ``article`` at once.
    """

    def contribute_to_class(self, cls: Any, name: str) -> None:
        # The feature is in use: writes must reach what peers cache.
        invalidation.connect()
        super().contribute_to_class(cls, name)

    def _django_scale_default(self) -> bool:
        """Whether this related manager is the relation's default one, on the row's database.

        ``obj.rel(manager="name")`` builds it from another manager class, and
        ``db_manager()`` / ``using()`` set the manager's ``_db`` (``BaseManager.db_manager()``,
        django/db/models/manager.py, Django 4.2 to 6.1): those read on their own, never
        from or into what peers share.
        """
        if self.__dict__.get("_db") is not None:
            return False
        return type(self).__bases__[0] is type(self.model._default_manager)

    def _django_scale_group(self) -> peers.PeerGroup | None:
        """The peers of the row this related manager belongs to, when they load together."""
        instance = self.__dict__.get("instance")
        if instance is None:
            return None
        group = peers.peer_group(instance)
        if group is None or len(group.members) < 2 or not group.batch:
            return None
        relation = loaders.many_relation(self)
        if relation is None or not self._django_scale_default():
            return None
        if relation.cache_name in instance.__dict__.get("_prefetched_objects_cache", ()):
            return None  # prefetched: Django answers from its cache
        if group.refreshed(instance):
            group.forget()  # refresh_from_db(): read everything again
        loaded = group.many.get(relation.cache_name)
        if loaded is not None:
            rows = loaded.get(instance.__dict__.get(relation.parent_attname), ())
            if any(row.pk is None for row in rows):
                group.forget((relation.cache_name,))  # a row was deleted
        return group

    def _django_scale_single(self) -> Any:
        """The queryset ``count()`` and ``exists()`` of one row run, as Django's would.

        Django 5.0+ counts a many-to-many relation on its through table alone
        (``ManyRelatedManager.constrained_target``) when the related model's manager is a
        plain ``Manager``; a prefetch-aware manager that selects every row (no filter of
        its own) takes the same path.
        """
        instance: Any = self.__dict__.get("instance")
        relation = loaders.many_relation(self) if instance is not None else None
        if (
            relation is not None
            and relation.reverse_fk is None
            and relation.cache_name not in instance.__dict__.get("_prefetched_objects_cache", ())
            and loaders.plain(loaders.base_queryset(self))
        ):
            target = getattr(self, "constrained_target", None)
            if target is not None:
                detection.note_single(peers.peer_group(instance), relation.label, instance)
                return target
        return self.get_queryset()

    def get_queryset(self) -> Any:
        queryset = super().get_queryset()
        if "instance" in self.__dict__ and isinstance(queryset, PrefetchAwareQuerySetMixin):
            relation = loaders.many_relation(self)
            if relation is not None:
                queryset._django_scale_related = relation.label
        return queryset

    def all(self) -> Any:
        queryset = super().all()
        if isinstance(queryset, PrefetchAwareQuerySetMixin) and queryset._result_cache is None:
            group = self._django_scale_group()
            if group is not None:
                queryset._django_scale_peer_load = plain.PeerLoad(self, group)  # type: ignore[attr-defined]
        return queryset

    def count(self) -> int:
        group = self._django_scale_group()
        if group is not None:
            counted = loaders.count_many(self, group)
            if counted is not None:
                return counted
        return int(self._django_scale_single().count())

    def exists(self) -> bool:
        group = self._django_scale_group()
        if group is not None:
            counted = loaders.count_many(self, group)
            if counted is not None:
                return counted > 0
        return bool(self._django_scale_single().exists())

    def first(self) -> Any:
        return self.all().first()

    def last(self) -> Any:
        return self.all().last()


class CachedQuerySetMixin(PrefetchAwareQuerySetMixin):
    """Add ``cached()``: serve a queryset's rows from the query cache (:mod:`django_scale.cache.queries`)."""

    _django_scale_cache: CacheOptions | None = None

    def cached(
        self,
        *,
        timeout: float = 3600.0,
        stale: float = 0.0,
        tables: tuple[str, ...] | list[str] = (),
        version: int | str = 1,
    ) -> Any:
        """Return a copy whose rows come from the query cache while none of its tables changed.

        An entry is valid while it was read at or after the last committed write of every
        table the query reads (WAL positions, see docs/querycache.md), for at most *timeout*
        seconds. With *stale*, an invalidated entry younger than *stale* seconds is served
        while one refill runs (never to a request that wrote). *tables* names tables the SQL
        does not (a view's). Only the rows of iterating the queryset (``list()``, ``for``,
        ``get()``, ``first()``) are cached; ``count()``, ``exists()``, ``aggregate()`` and
        ``iterator()`` run the query.
        """
        options = CacheOptions(timeout=timeout, stale=stale, tables=tuple(tables), version=version)
        clone: Any = self._chain()  # type: ignore[attr-defined]
        clone._django_scale_cache = options
        return clone

    def _clone(self) -> Any:
        clone: Any = super()._clone()
        if "_django_scale_cache" in self.__dict__:
            clone._django_scale_cache = self.__dict__["_django_scale_cache"]
        return clone

    def _django_scale_rows(self) -> list[Any]:
        options = self._django_scale_cache
        if options is None:
            return super()._django_scale_rows()
        return fetch_rows(self, super()._django_scale_rows, options)


# QuerySet is generic only in django-stubs; subscripting it fails at run time.
class ScaleQuerySet(ApproxCountQuerySetMixin, CachedQuerySetMixin, models.QuerySet):  # type: ignore[type-arg]
    """The project-wide queryset for big tables: ``objects = ScaleQuerySet.as_manager()``.

    It counts approximately (:meth:`approx_count`), loads relations for all rows of a
    result set at once (:class:`PrefetchAwareQuerySetMixin`) and caches rows on request
    (:meth:`~CachedQuerySetMixin.cached`).
    """
