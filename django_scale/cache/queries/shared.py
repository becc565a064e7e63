"""The query cache's keys in the shared store (Redis): entries, write positions, incarnations.

Every key has the hash tag ``{qc}``, so one ``MGET`` reads an entry with everything that
decides whether it is valid, on Redis Cluster too (one slot):

* ``qc:{qc}:e:<digest>``: an entry (:class:`Entry`, pickled by the cache's serializer);
* ``qc:{qc}:t:<database>:<table>``: the write position of a table of the database named
  ``<database>`` (the ``NAME`` of its aliases: a primary and its standbys share it);
* ``qc:{qc}:i:<alias>``: the incarnation of the server behind a database alias;
* ``qc:{qc}:all:gen``: a generation every entry is stamped with, bumped by
  :data:`EVERYTHING` when an invalidation could not be published (it is journaled by
  :mod:`django_scale.cache.invalidations`, whose replay bumps it as it bumps a function's).

A missing position or incarnation makes an entry miss: a flushed or evicted store never
validates an entry. A position is stored with the generation it was set in
(``<generation>~<cluster>|<LSN>``, the LSN followed by ``+`` when it is *bounded*, see
:mod:`~django_scale.cache.queries.positions`): once the generation is bumped, every position counts as
missing until a write or a read's seed sets it again. So an invalidation of everything also
forgets the positions that an entry read on a lagging standby would otherwise pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from django_scale.cache.queries.positions import ReadPosition
from django_scale.cache.store import CacheDown, RedisStore, claim_key

if TYPE_CHECKING:
    from redis import Redis

    from django_scale.cache.queries.storing import Outgoing

__all__ = ["EVERYTHING", "MARKER", "Entry", "SharedPositions"]

#: First item of every entry; a value without it is not an entry.
MARKER = "django_scale.querycache.2"
#: The key whose journaled invalidation invalidates every entry (``_INVALIDATE`` bumps ``:gen``).
EVERYTHING = "qc:{qc}:all"
_GENERATION = EVERYTHING + ":gen"

#: Move a position forward only: set each key (KEYS[2:]) to ARGV[1], tagged with the current
#: generation (KEYS[1]), unless it holds a later position of the same cluster in that
#: generation (positions are "cluster|hex LSN" of one width: text order is LSN order).
#: ARGV[2]: expiry in ms.
_ADVANCE = """
local generation = redis.call('GET', KEYS[1]) or '0'
local tagged = generation .. '~' .. ARGV[1]
local cluster = string.match(ARGV[1], '^[^|]*')
for index = 2, #KEYS do
  local key = KEYS[index]
  local current = redis.call('GET', key)
  if not current or string.match(current, '^[^~]*') ~= generation
     or string.match(current, '~([^|]*)') ~= cluster or current < tagged then
    redis.call('SET', key, tagged, 'PX', ARGV[2])
  end
end
return 1
"""

#: Seed positions: set each key (KEYS[2:]) that has no position in the current generation
#: (KEYS[1]) to ARGV[1], but only while the generation is still ARGV[3], the one the seeding
#: read saw (a read that started before an invalidation must not seed after it). ARGV[2]:
#: expiry in ms.
_SEED = """
local generation = redis.call('GET', KEYS[1]) or '0'
if generation ~= ARGV[3] then
  return 0
end
for index = 2, #KEYS do
  local key = KEYS[index]
  local current = redis.call('GET', key)
  if not current or string.match(current, '^[^~]*') ~= generation then
    redis.call('SET', key, generation .. '~' .. ARGV[1], 'PX', ARGV[2])
  end
end
return 1
"""


def _untag(value: str | None, generation: str) -> str | None:
    """The position *value* holds in *generation*, or ``None`` (none, or of another generation)."""
    if value is None:
        return None
    tag, separator, position = value.partition("~")
    return position if separator and tag == generation else None


class Entry(NamedTuple):
    marker: str
    #: Where the rows were read.
    read: ReadPosition
    #: The tables the rows depend on.
    tables: tuple[str, ...]
    #: The value of ``qc:{qc}:all:gen`` when the entry was stored.
    generation: int
    #: Wall-clock time of the read (for ``stale=``).
    created: float
    rows: Any


def entry_key(digest: str) -> str:
    return f"qc:{{qc}}:e:{digest}"


def table_key(database: str, table: str) -> str:
    return f"qc:{{qc}}:t:{database}:{table}"


def incarnation_key(alias: str) -> str:
    return f"qc:{{qc}}:i:{alias}"


class SharedPositions:
    """The query cache's reads and writes on the Redis behind an SWR :class:`RedisStore`."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.client = store.client

    def _redis(self) -> Redis:
        return cast("Redis", self.client.get_client(write=True))

    def _key(self, key: str) -> str:
        return str(self.client.make_key(key))

    def fetch(
        self,
        key: str,
        alias: str,
        tables: Sequence[str],
        database: str,
        unsent: bytes | None = None,
        outgoing: Sequence[Outgoing] = (),
        claim: bool = False,
    ) -> tuple[Any, ...]:
        """Return ``(entry or None, incarnation, generation, claimed, *positions)`` in one
        round trip.

        *unsent* is this process's newer payload of *key*, not sent yet: it is the entry then.
        *outgoing* entries are stored in the same round trip, before the ``MGET``. With
        *claim*, ``claimed`` is whether a refill of *key* holds its claim (else ``False``):
        a reader that may serve the entry stale then needs no round trip to try to claim it.
        """
        keys = [
            key,
            incarnation_key(alias),
            _GENERATION,
            *((claim_key(key),) if claim else ()),
            *(table_key(database, table) for table in tables),
        ]
        try:
            if outgoing:
                pipe = self._redis().pipeline(transaction=False)
                self._add_sets(pipe, outgoing)
                pipe.mget([self._key(k) for k in keys])
                raw = pipe.execute()[-1]
            else:
                raw = self._redis().mget([self._key(k) for k in keys])
        except Exception as error:
            raise CacheDown(str(error)) from error
        entry: Entry | None = None
        payload = raw[0] if unsent is None else unsent
        if payload is not None:
            try:
                value = self.client.decode(payload)
            except Exception:
                value = None  # a value a deploy cannot unpickle is a miss
            if isinstance(value, tuple) and len(value) == 6 and value[0] == MARKER:
                entry = Entry(*value)
        incarnation, generation, *found = [
            item.decode() if isinstance(item, bytes) else item for item in raw[1:]
        ]
        claimed = claim and found.pop(0) is not None
        current = generation or "0"
        return (entry, incarnation, generation, claimed, *(_untag(value, current) for value in found))

    def encode(self, entry: Entry) -> bytes:
        """Return *entry* pickled as the cache's serializer stores it."""
        return bytes(self.client.encode(tuple(entry)))

    def store_entry(
        self,
        key: str,
        payload: bytes,
        timeout: float,
        incarnation: tuple[str, str, float] | None = None,
    ) -> None:
        """Store an encoded entry; with *incarnation* ``(alias, incarnation, keep_for)``, the
        incarnation of the server behind the alias too, first (one round trip)."""
        try:
            pipe = self._redis().pipeline(transaction=False)
            if incarnation is not None:
                alias, value, keep_for = incarnation
                pipe.set(self._key(incarnation_key(alias)), value, px=max(1, int(keep_for * 1000)))
            pipe.set(self._key(key), payload, px=max(1, int(timeout * 1000)))
            pipe.execute()
        except Exception as error:
            raise CacheDown(str(error)) from error

    def _add_sets(self, pipe: Any, outgoing: Sequence[Outgoing]) -> None:
        for item in outgoing:
            pipe.set(self._key(item.key), item.payload, px=max(1, int(item.timeout * 1000)))

    def send(self, outgoing: Sequence[Outgoing]) -> None:
        """Store *outgoing* entries (one round trip)."""
        try:
            pipe = self._redis().pipeline(transaction=False)
            self._add_sets(pipe, outgoing)
            pipe.execute()
        except Exception as error:
            raise CacheDown(str(error)) from error

    def advance(self, database: str, tables: Iterable[str], position: str, keep_for: float) -> None:
        """Move the write positions of *tables* forward to *position* (never back)."""
        keys = [self._key(table_key(database, table)) for table in sorted(set(tables))]
        if not keys:
            return
        script = self.store._script(self._redis(), _ADVANCE)
        try:
            script(keys=[self._key(_GENERATION), *keys], args=[position, max(1, int(keep_for * 1000))])
        except Exception as error:
            raise CacheDown(str(error)) from error

    def seed(
        self, database: str, tables: Iterable[str], position: str, keep_for: float, generation: int
    ) -> None:
        """Give *tables* without a position in this generation the position *position*.

        Only while the generation is still *generation*, the one the seeding read saw.
        """
        keys = [self._key(table_key(database, table)) for table in sorted(set(tables))]
        if not keys:
            return
        script = self.store._script(self._redis(), _SEED)
        try:
            script(
                keys=[self._key(_GENERATION), *keys],
                args=[position, max(1, int(keep_for * 1000)), str(generation)],
            )
        except Exception as error:
            raise CacheDown(str(error)) from error
