"""``approx_count(queryset)``: how many rows, without ``COUNT(*)`` over a big table.

The answer is a :class:`ApproxCount`: an ``int`` that also says how it was obtained.

* Below ``threshold`` rows it is **exact**, found by counting at most ``threshold + 1`` rows,
  so even a badly wrong estimate never leads to a full count.
* Above it on PostgreSQL it is an **estimate**: unfiltered, from ``pg_class.reltuples`` scaled
  by the relation's current size (the planner's own method), summed over the partitions of a
  partitioned table; filtered, from the ``EXPLAIN`` row estimate of the query.
* For filters the planner cannot estimate (substring searches such as ``icontains``) it is a
  **capped** count: the rows up to ``cap + 1`` counted within a time budget; "10,000+".
* With ``statistics=False`` (a queryset that hides rows of its table from its user) nothing
  comes from statistics: exact below ``threshold``, a lower bound above it.

Everything runs on the queryset's own database alias: the replica an admin page reads from
answers for the rows it shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal

from django.db import DatabaseError, connections
from django.db.models import Model, QuerySet
from django.db.models.lookups import Lookup
from django.utils.formats import number_format
from django.utils.translation import gettext, ngettext

from django_scale.exceptions import ArgumentError
from django_scale.metrics import counters
from django_scale.timeouts import current_statement_timeout, is_statement_timeout, statement_timeout

__all__ = ["ApproxCount", "approx_count"]

#: Below this many rows a count is exact.
DEFAULT_THRESHOLD = 10_000
#: A capped count counts at most this many rows.
DEFAULT_CAP = 10_000
#: Seconds a capped count may take before the estimate is used instead.
DEFAULT_BUDGET = 0.2

#: Lookups whose selectivity PostgreSQL's planner guesses rather than estimates.
UNPLANNABLE_LOOKUPS = frozenset(
    {"contains", "icontains", "endswith", "iendswith", "regex", "iregex", "search", "trigram_similar"}
)

Method = Literal["exact", "estimate", "capped"]


class ApproxCount(int):
    """A row count that knows whether it is exact, estimated or a lower bound.

    It is an ``int`` (so ``paginator.count`` arithmetic and ``{% if count == 1 %}`` work) whose
    ``str()`` is what a page should show: ``"12,345"``, ``"≈ 12.3 million"`` or ``"10,000+"``.
    """

    method: Method

    def __new__(cls, value: int, method: Method = "exact") -> ApproxCount:
        count = super().__new__(cls, max(int(value), 0))
        count.method = method
        return count

    @property
    def is_exact(self) -> bool:
        return self.method == "exact"

    def __repr__(self) -> str:
        return f"ApproxCount({int(self)}, {self.method!r})"

    def __str__(self) -> str:
        value = int(self)
        if self.method == "exact":
            return number_format(value, force_grouping=True)
        if self.method == "capped":
            # Translators: a count of at least this many rows, e.g. "10,000+".
            return gettext("%(count)s+") % {"count": number_format(value, force_grouping=True)}
        return gettext("≈ %(count)s") % {"count": _compact(value)}

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(int(self), spec)


def _compact(value: int) -> str:
    """Return *value* rounded to three significant figures in words: ``"12.3 million"``."""
    for size, singular, plural in (
        (10**9, "%(value)s billion", "%(value)s billion"),
        (10**6, "%(value)s million", "%(value)s million"),
    ):
        if value >= size:
            scaled = value / size
            shown = number_format(
                round(scaled, 1 if scaled < 100 else 0), decimal_pos=1 if scaled < 100 else 0
            )
            return ngettext(singular, plural, math.ceil(scaled)) % {"value": shown}
    significant = 10 ** max(len(str(value)) - 3, 0)
    return number_format(round(value / significant) * significant, force_grouping=True)


def _shape(queryset: QuerySet[Any]) -> tuple[bool, bool]:
    """Return whether *queryset* is filtered (or DISTINCT), and whether the planner can estimate it."""
    lookups: list[Lookup[Any]] = []

    def walk(node: Any) -> None:
        for child in getattr(node, "children", ()):
            if isinstance(child, Lookup):
                lookups.append(child)
            else:
                walk(child)

    walk(queryset.query.where)
    plannable = all(lookup.lookup_name not in UNPLANNABLE_LOOKUPS for lookup in lookups)
    # A search across a many-to-many relation makes the admin's queryset DISTINCT: the plan's
    # estimate covers it, and the exact path counts no more than threshold + 1 rows.
    return bool(queryset.query.where) or queryset.query.distinct, plannable


def approx_count(
    queryset: QuerySet[Any],
    *,
    threshold: int = DEFAULT_THRESHOLD,
    cap: int = DEFAULT_CAP,
    budget: float = DEFAULT_BUDGET,
    statistics: bool = True,
    cached: bool = False,
) -> ApproxCount:
    """Return how many rows *queryset* has: exact when small, else an estimate or a lower bound.

    With ``statistics=False`` the count never comes from the table's statistics (``pg_class``,
    the planner's estimate), which describe rows the queryset may hide from its user: it is
    exact below *threshold* rows, else ``threshold`` as a lower bound; a filter the planner
    cannot estimate is counted up to ``cap + 1`` rows within *budget*, and a count that runs
    out of it raises the database's error (see :func:`~django_scale.timeouts.is_statement_timeout`),
    since there is no estimate to fall back on.

    With ``cached=True`` the rows it counts (their primary keys, at most ``threshold + 1`` or
    ``cap + 1`` of them) are read through the query cache (``.cached()``, see
    :doc:`/querycache`): a count served again while none of its table's rows changed costs no
    query, and one after a write to the table is counted again, never stale. The queryset must
    have ``cached()`` (:class:`~django_scale.querysets.ScaleQuerySet`), and ``QUERY_CACHE``
    on for it to cache anything.
    """
    if cached and not hasattr(queryset, "cached"):
        raise ArgumentError(
            f"approx_count(cached=True) needs a queryset with cached() (a ScaleQuerySet), not "
            f"{type(queryset).__qualname__} of {queryset.model.__qualname__}."
        )
    if threshold < 1 or cap < 1 or budget <= 0:
        raise ArgumentError(
            f"approx_count() needs threshold >= 1, cap >= 1 and budget > 0, not threshold={threshold!r}, "
            f"cap={cap!r}, budget={budget!r}."
        )
    counted = _approx_count(
        queryset, threshold=threshold, cap=cap, budget=budget, statistics=statistics, cached=cached
    )
    counters.increment("counts.exact" if counted.is_exact else "counts.approx")
    return counted


def _approx_count(
    queryset: QuerySet[Any], *, threshold: int, cap: int, budget: float, statistics: bool, cached: bool
) -> ApproxCount:
    # Route once: every query below runs on the same database (queryset.db asks the router).
    alias = queryset.db
    queryset = queryset.using(alias).order_by()
    query = queryset.query
    if query.is_sliced or query.group_by is not None or query.combinator:
        # Shapes the estimators do not model: count them exactly, as Django would.
        return ApproxCount(queryset.count(), "exact")
    if connections[alias].vendor != "postgresql":
        # No statistics to estimate from: count, but never past the threshold.
        return _exact_or_bound(queryset, threshold, None, cached)
    filtered, plannable = _shape(queryset)
    if not statistics:
        if filtered and not plannable:
            return _capped(queryset, max(cap, threshold), budget, None, cached)
        return _exact_or_bound(queryset, threshold, None, cached)
    if filtered and not plannable:
        # The planner only guesses a substring filter's selectivity: count within a budget.
        return _capped(queryset, max(cap, threshold), budget, _explain_estimate, cached)
    estimate = None if filtered else _table_estimate(alias, queryset.model)
    if estimate is None:
        estimate = _explain_estimate(queryset)
    if estimate is not None and estimate > threshold:
        return ApproxCount(estimate, "estimate")
    # Small, or unknown: the exact number, counting no more than threshold + 1 rows, so an
    # estimate that is far too low never turns into a count of the whole table.
    return _exact_or_bound(queryset, threshold, estimate, cached)


def _exact_or_bound(
    queryset: QuerySet[Any], threshold: int, estimate: int | None, cached: bool
) -> ApproxCount:
    counted = _bounded_count(queryset, threshold + 1, cached)
    if counted <= threshold:
        return ApproxCount(counted, "exact")
    if estimate is not None and estimate > threshold:
        return ApproxCount(estimate, "estimate")
    return ApproxCount(threshold, "capped")


def _bounded_count(queryset: QuerySet[Any], limit: int, cached: bool = False) -> int:
    """Count the rows of *queryset*, stopping at *limit* (``SELECT COUNT(*) FROM (... LIMIT n)``);
    *cached*: the primary keys of those rows through the query cache, and their number."""
    if cached:
        keys: Any = queryset.values_list("pk", flat=True)[:limit]
        return len(keys.cached())
    return queryset.values("pk")[:limit].count()


def _capped(
    queryset: QuerySet[Any],
    cap: int,
    budget: float,
    fallback: Callable[[QuerySet[Any]], int | None] | None,
    cached: bool,
) -> ApproxCount:
    """Count up to *cap* + 1 rows within *budget* seconds (PostgreSQL); else use the estimate."""
    alias = queryset.db  # pinned by approx_count(): no router call
    # Never loosen a tighter limit that the caller (an admin page) already set.
    limit = current_statement_timeout(alias)
    try:
        with statement_timeout(budget if limit is None else min(budget, limit), using=alias):
            counted = _bounded_count(queryset, cap + 1, cached)
    except DatabaseError as error:
        estimate = None if fallback is None or not is_statement_timeout(error) else fallback(queryset)
        if estimate is None:
            raise
        return ApproxCount(max(estimate, 1), "estimate")
    if counted > cap:
        return ApproxCount(cap, "capped")
    return ApproxCount(counted, "exact")


def _table_estimate(alias: str, model: type[Model]) -> int | None:
    """Rows of *model*'s table from the statistics, scaled to its current size; ``None`` if unknown."""
    connection = connections[alias]
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT c.reltuples, c.relpages,
                   pg_relation_size(c.oid) / current_setting('block_size')::int
              FROM pg_class c
             WHERE c.oid IN (
                   SELECT relid FROM pg_partition_tree(%s::regclass) WHERE isleaf
                   UNION SELECT %s::regclass)
               AND c.relkind IN ('r', 'm', 'f')
            """,
            [table, table],
        )
        rows = cursor.fetchall()
    if not rows:
        return None
    total = 0.0
    for reltuples, relpages, pages in rows:
        if reltuples < 0:
            # Never analysed (PostgreSQL 14+ says -1): no density to scale.
            return None
        if relpages > 0:
            # The planner's own method: the density at the last ANALYZE times today's pages.
            total += reltuples / relpages * pages
        else:
            total += reltuples
    return int(total)


def _explain_estimate(queryset: QuerySet[Any]) -> int | None:
    """The planner's row estimate for *queryset*, from ``EXPLAIN (FORMAT JSON)``."""
    alias = queryset.db
    sql, params = queryset.values("pk").query.get_compiler(using=alias).as_sql()
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            raw = cursor.fetchone()[0]
    except DatabaseError:
        return None
    plan = json.loads(raw) if isinstance(raw, str) else raw
    return int(plan[0]["Plan"]["Plan Rows"])
