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
validates an entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from django_scale.cache.queries.positions import ReadPosition
from django_scale.cache.store import CacheDown, RedisStore

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["EVERYTHING", "MARKER", "Entry", "SharedPositions"]

#: First item of every entry; a value without it is not an entry.
MARKER = "django_scale.querycache.1"
#: The key whose journaled invalidation invalidates every entry (``_INVALIDATE`` bumps ``:gen``).
EVERYTHING = "qc:{qc}:all"
_GENERATION = EVERYTHING + ":gen"

#: Move a position forward only: set each key (KEYS) to ARGV[1] unless it holds a later
#: position of the same cluster (positions are "cluster|hex LSN" of one width: text order
#: is LSN order). ARGV[2]: expiry in ms.
_ADVANCE = """
local cluster = string.match(ARGV[1], '^[^|]*')
for _, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if not current or string.match(current, '^[^|]*') ~= cluster or current < ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  end
end
return 1
"""


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

    def fetch(self, key: str, alias: str, tables: Sequence[str], database: str) -> tuple[Any, ...]:
        """Return ``(entry or None, incarnation, generation, *positions)`` in one round trip."""
        keys = [key, incarnation_key(alias), _GENERATION, *(table_key(database, table) for table in tables)]
        try:
            raw = self._redis().mget([self._key(k) for k in keys])
        except Exception as error:
            raise CacheDown(str(error)) from error
        entry: Entry | None = None
        if raw[0] is not None:
            try:
                value = self.client.decode(raw[0])
            except Exception:
                value = None  # a value a deploy cannot unpickle is a miss
            if isinstance(value, tuple) and len(value) == 6 and value[0] == MARKER:
                entry = Entry(*value)
        rest = [item.decode() if isinstance(item, bytes) else item for item in raw[1:]]
        return (entry, *rest)

    def store_entry(self, key: str, entry: Entry, timeout: float) -> None:
        payload = self.client.encode(tuple(entry))
        try:
            self._redis().set(self._key(key), payload, px=max(1, int(timeout * 1000)))
        except Exception as error:
            raise CacheDown(str(error)) from error

    def advance(self, database: str, tables: Iterable[str], position: str, keep_for: float) -> None:
        """Move the write positions of *tables* forward to *position* (never back)."""
        keys = [self._key(table_key(database, table)) for table in sorted(set(tables))]
        if not keys:
            return
        script = self.store._script(self._redis(), _ADVANCE)
        try:
            script(keys=keys, args=[position, max(1, int(keep_for * 1000))])
        except Exception as error:
            raise CacheDown(str(error)) from error

    def seed(self, database: str, tables: Iterable[str], position: str, keep_for: float) -> None:
        """Give *tables* that have no write position the position *position* (``SET NX``)."""
        redis = self._redis()
        try:
            pipeline = redis.pipeline(transaction=False)
            for table in set(tables):
                pipeline.set(
                    self._key(table_key(database, table)), position, nx=True, px=int(keep_for * 1000)
                )
            pipeline.execute()
        except Exception as error:
            raise CacheDown(str(error)) from error

    def set_incarnation(self, alias: str, incarnation: str, keep_for: float) -> None:
        try:
            self._redis().set(self._key(incarnation_key(alias)), incarnation, px=int(keep_for * 1000))
        except Exception as error:
            raise CacheDown(str(error)) from error
