"""Invalidations the cache could not take: kept on the primary, replayed once the cache answers.

An invalidation made while the cache is down (unreachable, hung, or skipped by an open
circuit breaker) is written to a *journal*, the table of
:class:`~django_scale.models.PendingInvalidation` on the ``PRIMARY`` database, inside the
caller's transaction when there is one. The journal outlives the process that wrote it (a
``max_requests`` recycle, a deploy) and is shared by every process on every host, so:

* a process that saw the cache fail checks the journal before its first read once the cache
  answers again, and replays it before serving anything;
* a process that starts checks the journal on its first cache read, so a recycled worker's
  invalidations are replayed by its successor;
* every process checks it again every :data:`CHECK_INTERVAL` seconds, off the request (on
  the refill publisher's thread), so one that neither saw the outage nor started after it
  finds the journal too, and a request never waits on that check.

Replaying bumps each key's generation, as a live invalidation does, so it is idempotent and a
refill that started before it cannot write the old value back. A replayed row is deleted.

Pending work is bounded: past :data:`KEYS_PER_GROUP` keys of one function (a *group*: the
function's path and version), the keys collapse into one row that invalidates every key of
the function; in memory, past :data:`KEYS_IN_MEMORY` keys, the largest groups collapse too.

What is not kept: when the database cannot take the row either (it is down too, or the
``django_scale`` migrations are not applied), the invalidation is kept in the process's memory
only, and is lost if the process exits before the cache answers. A process-local cache (local
memory, dummy) dies with its process, so its invalidations are never journaled.

The journal is written only when the cache is down; on the healthy path the only cost is
the check: one ``SELECT`` before a new process's first read, and one per process per
:data:`CHECK_INTERVAL` off the request.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypeVar

from django.db import connections, transaction
from django.db.models import Max

from django_scale import metrics
from django_scale.conf import conf

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from django_scale.models import PendingInvalidation

__all__ = [
    "CHECK_INTERVAL",
    "KEYS_IN_MEMORY",
    "KEYS_PER_GROUP",
    "Pending",
    "due",
    "group_of",
    "keep",
    "mark_due",
    "pending_in_memory",
    "replay",
    "replay_due",
    "reset",
]

logger = logging.getLogger("django_scale.cache")

T = TypeVar("T")

#: Keys of one group (a function's path and version) kept one by one; past that, the group.
KEYS_PER_GROUP = 1000
#: Keys a process keeps one by one in memory, over all groups; past that, the largest collapse.
KEYS_IN_MEMORY = 10_000
#: Seconds between two checks of the journal by a process whose cache answers.
CHECK_INTERVAL = 60.0
#: Journal rows read per query while replaying.
REPLAY_BATCH = 500

#: A key made by ``django_scale.cache.build_key``: ``swr:{<path>:<version>:<32 hex digits>}``.
_KEY = re.compile(r"swr:\{.*:[0-9a-f]{32}\}", re.DOTALL)


def group_of(key: str) -> str:
    """Return the group of *key*: the key up to its argument digest (``swr:{path:version``).

    A key of another shape belongs to the group ``""``, which stands for every SWR key.
    """
    return key[:-34] if _KEY.fullmatch(key) else ""


class Invalidator(Protocol):
    """What a replay needs of a store (``django_scale.cache.Store``)."""

    #: Whether the cache lives and dies with the process (local memory, dummy).
    process_local: bool

    def invalidate(self, key: str, keep_for: float) -> None: ...

    def invalidate_group(self, group: str, keep_for: float) -> None: ...


# -- In memory: what the database could not take ------------------------------------------------


class Pending:
    """The invalidations of one cache alias kept in this process's memory, bounded."""

    def __init__(self) -> None:
        self.keys: dict[str, float] = {}
        self.groups: dict[str, float] = {}
        self.sizes: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.keys) + len(self.groups)

    def add(self, group: str, key: str, keep_for: float) -> None:
        """Keep the invalidation of *key* (of *group*), or of the whole *group* when *key* is empty."""
        if group in self.groups:
            self.groups[group] = max(self.groups[group], keep_for)
            return
        if not key:
            self.collapse(group, keep_for)
            return
        if key not in self.keys:
            self.sizes[group] += 1
        self.keys[key] = max(self.keys.get(key, 0.0), keep_for)
        if self.sizes[group] > KEYS_PER_GROUP:
            self.collapse(group)
        while len(self.keys) > KEYS_IN_MEMORY:
            self.collapse(self.sizes.most_common(1)[0][0])

    def collapse(self, group: str, keep_for: float = 0.0) -> None:
        """Replace the kept keys of *group* by the whole group."""
        for key in [key for key in self.keys if group_of(key) == group]:
            keep_for = max(keep_for, self.keys.pop(key))
        self.sizes.pop(group, None)
        self.groups[group] = max(self.groups.get(group, 0.0), keep_for)

    def entries(self) -> list[tuple[str, str, float]]:
        """Return ``(group, key, keep_for)`` for each kept invalidation (key ``""``: the group)."""
        return [(group, "", keep_for) for group, keep_for in self.groups.items()] + [
            (group_of(key), key, keep_for) for key, keep_for in self.keys.items()
        ]

    def discard(self, group: str, key: str) -> None:
        if key:
            if self.keys.pop(key, None) is not None:
                self.sizes[group] -= 1
                if self.sizes[group] <= 0:
                    del self.sizes[group]
        else:
            self.groups.pop(group, None)


_lock = threading.Lock()
_memory: dict[str, Pending] = {}
# Monotonic time of each alias's next journal check; an alias missing is due now (a new
# process, or one that saw the cache fail).
_next_check: dict[str, float] = {}
_replay_locks: dict[str, threading.Lock] = {}


def due(alias: str) -> bool:
    """Whether this process must check the journal of *alias* (call :func:`replay_due` then)."""
    return time.monotonic() >= _next_check.get(alias, 0.0)


def replay_due(alias: str, store: Invalidator, submit: Callable[[Callable[[], None]], None]) -> None:
    """Check the journal of *alias*, which :func:`due` says is due, before reading or off the request.

    Before the read when the process has not checked since it started or saw the cache fail
    (see :func:`replay`); else the periodic check goes to *submit* (the refill publisher), so a
    request never waits on it.
    """
    if alias not in _next_check:
        replay(alias, store)
        return
    _next_check[alias] = time.monotonic() + CHECK_INTERVAL  # one request schedules it

    def check() -> None:
        try:
            replay(alias, store, force=True)
        except Exception:
            # The cache failed (the database's failures are handled in replay): the next
            # read replays before it serves.
            mark_due(alias)

    submit(check)


def mark_due(alias: str) -> None:
    """Check the journal of *alias* before the next read (the cache failed, or was invalidated down)."""
    _next_check.pop(alias, None)


def reset() -> None:
    """Forget what this process keeps and knows, as a new process would (for tests)."""
    with _lock:
        _memory.clear()
        _next_check.clear()


def pending_in_memory(alias: str) -> int:
    """How many invalidations of *alias* this process keeps in memory (keys plus whole groups)."""
    pending = _memory.get(alias)
    return 0 if pending is None else len(pending)


# -- The journal: the table on the primary ------------------------------------------------------


class JournalUnavailable(Exception):
    """The journal could not be read or written (internal: the database failed or lacks the table)."""


def _journal() -> QuerySet[PendingInvalidation]:
    # Imported here: the model needs the app registry, and django_scale may not be installed.
    from django_scale.models import PendingInvalidation

    return PendingInvalidation.objects.using(conf.PRIMARY)


def _on_primary(operation: Callable[[], T], *, atomic: bool) -> T:
    """Run *operation* on the primary so that a failure never breaks the caller's transaction.

    Inside ``atomic()`` it runs in a savepoint, so a database error (a missing table, a
    read-only transaction) rolls back only what it did. Outside, it runs in a transaction of
    its own when *atomic*, else in autocommit. Any failure raises :class:`JournalUnavailable`.
    """
    try:
        if atomic or transaction.get_connection(conf.PRIMARY).in_atomic_block:
            with transaction.atomic(using=conf.PRIMARY):
                return operation()
        return operation()
    except Exception as error:
        raise JournalUnavailable(repr(error)) from error


def _write(alias: str, entries: Iterable[tuple[str, str, float]]) -> None:
    """Journal *entries* ``(group, key, keep_for)``, collapsing a group past :data:`KEYS_PER_GROUP`."""
    journal = _journal()
    for group, key, keep_for in entries:
        rows = journal.filter(alias=alias, group=group)
        if rows.filter(key="").exists():
            continue  # the whole group is pending already
        if key:
            journal.create(alias=alias, group=group, key=key, keep_for=keep_for)
            if rows.count() <= KEYS_PER_GROUP:
                continue
        longest = rows.aggregate(longest=Max("keep_for"))["longest"] or 0.0
        journal.create(alias=alias, group=group, key="", keep_for=max(keep_for, longest))
        rows.exclude(key="").delete()


def keep(alias: str, key: str, keep_for: float, *, process_local: bool) -> str:
    """Keep the invalidation of *key*, which cache *alias* could not take; return where it went.

    ``"journal"`` (the table on the primary, in the caller's transaction when there is one) or
    ``"memory"`` (this process only: the cache is process-local, or the database failed too).
    What this process kept in memory earlier goes to the journal with it.
    """
    mark_due(alias)
    group = group_of(key)
    if not process_local:
        with _lock:
            earlier = _memory.get(alias)
            moved = earlier.entries() if earlier is not None else []
        try:
            _on_primary(lambda: _write(alias, [*moved, (group, key, keep_for)]), atomic=True)
        except JournalUnavailable as error:
            metrics.increment("swr.invalidation.journal_failed")
            logger.warning(
                "cannot journal the invalidation of %s (%s); keeping it in this process only, "
                "so it is lost if the process exits before cache %r answers",
                key,
                error,
                alias,
            )
        else:
            if earlier is not None:
                with _lock:
                    for moved_group, moved_key, _ in moved:
                        earlier.discard(moved_group, moved_key)
            metrics.increment("swr.invalidation.journaled")
            return "journal"
    with _lock:
        _memory.setdefault(alias, Pending()).add(group, key, keep_for)
    metrics.increment("swr.invalidation.kept_in_memory")
    return "memory"


def _replay_memory(alias: str, store: Invalidator) -> None:
    with _lock:
        pending = _memory.get(alias)
        entries = pending.entries() if pending is not None else []
    for group, key, keep_for in entries:
        if key:
            store.invalidate(key, keep_for)
        else:
            store.invalidate_group(group, keep_for)
        with _lock:
            if pending is not None:
                pending.discard(group, key)


def _replay_journal(alias: str, store: Invalidator) -> bool:
    """Replay the journal of *alias* into *store* and delete what was replayed.

    Return whether the journal is empty now. Rows are deleted only after the cache took them,
    and only outside ``atomic()``: inside, they stay for a later check, so the caller's
    transaction never holds locks on the journal that other processes' replays would wait for.
    """
    journal = _journal()
    in_atomic = transaction.get_connection(conf.PRIMARY).in_atomic_block
    after = 0
    while True:
        rows: list[tuple[int, str, str, float]] = _on_primary(
            lambda after=after: list(  # type: ignore[misc]
                journal.filter(alias=alias, pk__gt=after)
                .order_by("pk")
                .values_list("pk", "group", "key", "keep_for")[:REPLAY_BATCH]
            ),
            atomic=False,
        )
        if not rows:
            return after == 0 or not in_atomic
        groups = {group: keep_for for _, group, key, keep_for in rows if not key}
        for group, keep_for in groups.items():
            store.invalidate_group(group, keep_for)
        for _, group, key, keep_for in rows:
            if key and group not in groups:
                store.invalidate(key, keep_for)
        metrics.increment("swr.invalidation.replayed", len(rows))
        if not in_atomic:
            pks = [row[0] for row in rows]
            _on_primary(lambda pks=pks: journal.filter(pk__in=pks).delete(), atomic=False)  # type: ignore[misc]
        if len(rows) < REPLAY_BATCH:
            return not in_atomic
        after = rows[-1][0]


def replay(alias: str, store: Invalidator, *, force: bool = False) -> None:
    """Replay the invalidations of *alias* kept in memory and in the journal, then note the check.

    Called before a read when :func:`due`. The process's other threads wait for the one
    replaying, so none of them serves a value the journal invalidates. A cache failure
    (``django_scale.cache.CacheDown``) propagates, and the replay stays due; a database
    failure is logged, and the journal is checked again after :data:`CHECK_INTERVAL`.
    """
    with _lock:
        lock = _replay_locks.setdefault(alias, threading.Lock())
    with lock:
        if not force and not due(alias):
            return  # another thread replayed meanwhile
        _replay_memory(alias, store)
        complete = True
        if not store.process_local:
            primary = connections[conf.PRIMARY]
            opened_here = primary.connection is None
            try:
                complete = _replay_journal(alias, store)
            except JournalUnavailable as error:
                metrics.increment("swr.invalidation.journal_failed")
                logger.warning(
                    "cannot read the journal of invalidations of cache %r (%s); checking again in %.0f s",
                    alias,
                    error,
                    CHECK_INTERVAL,
                )
            finally:
                # The check may run on a thread no request cleans up after (an async function's
                # sync_to_async thread): close a connection that only the check opened.
                if opened_here and not primary.in_atomic_block:
                    primary.close()
        if complete:
            _next_check[alias] = time.monotonic() + CHECK_INTERVAL
