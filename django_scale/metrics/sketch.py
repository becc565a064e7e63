"""A mergeable relative-error quantile sketch (DDSketch's logarithmic buckets).

A value ``v`` falls in bucket ``ceil(log(v) / log(gamma))`` with ``gamma = (1 + a) / (1 - a)``;
every value of a bucket is within the relative accuracy ``a`` of the bucket's representative
``2 * gamma**k / (gamma + 1)``. So a quantile read off merged bucket counts is within ``a`` of
a value of the right rank, whatever the distribution, and merging is adding counts: the
sketches of every worker and every host add up to the sketch of all their values (Masson,
Rim and Lee, "DDSketch", VLDB 2019). The mapping is the same as the ``ddsketch`` package's
``LogarithmicMapping``, so its sketches serve as the test oracle.

Buckets are numbered from 0: bucket 0 holds every value up to :data:`MIN_VALUE` (including 0),
the last every value from :data:`MAX_VALUE` on. With ``a = 1 %`` over ``[10 µs, 1000 s]`` that
is :data:`BUCKETS` (924) buckets, kept sparse: only the buckets a series touches take memory.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial, reduce
from itertools import accumulate, compress
from operator import add
from typing import Any

from django_scale.exceptions import MetricsDocumentError

__all__ = [
    "BUCKETS",
    "DenseSketch",
    "MAX_VALUE",
    "MIN_VALUE",
    "RELATIVE_ACCURACY",
    "Sketch",
    "bucket_of",
    "buckets_of",
    "bucket_value",
]

#: The relative accuracy of every quantile: 1 %.
RELATIVE_ACCURACY = 0.01
#: Values up to this (seconds) share bucket 0.
MIN_VALUE = 1e-5
#: Values from this (seconds) on share the last bucket.
MAX_VALUE = 1e3

_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
_MULTIPLIER = 1 / _LOG_GAMMA
# The key (ceil(log_gamma(v))) of MIN_VALUE: bucket 1 holds the key right after it.
_OFFSET = math.ceil(math.log(MIN_VALUE) * _MULTIPLIER)
#: How many buckets: bucket 0 (up to MIN_VALUE), one per key up to MAX_VALUE's, and the last.
BUCKETS = math.ceil(math.log(MAX_VALUE) * _MULTIPLIER) - _OFFSET + 2
_LAST = BUCKETS - 1
_log = math.log
_ceil = math.ceil


def bucket_of(value: float) -> int:
    """Return the bucket of *value* (seconds): 0 up to :data:`MIN_VALUE`, then one per key."""
    if value <= MIN_VALUE:
        return 0
    index = _ceil(_log(value) * _MULTIPLIER) - _OFFSET
    return index if index < _LAST else _LAST


def _upper_edges() -> list[float]:
    """The largest value of each bucket but the last (found from ``bucket_of()`` itself, float by float)."""
    edges = []
    for index in range(_LAST):
        edge = _GAMMA ** (index + _OFFSET)  # within a few floats of the edge
        while bucket_of(edge) > index:
            edge = math.nextafter(edge, 0.0)
        while bucket_of(math.nextafter(edge, math.inf)) <= index:
            edge = math.nextafter(edge, math.inf)
        edges.append(edge)
    return edges


#: The largest value of each bucket but the last: the bucket of a value is how many are below it.
_EDGES = _upper_edges()


def buckets_of(values: Iterable[float]) -> Iterator[int]:
    """Return the bucket of each of *values*, as :func:`bucket_of` (a binary search in C per value)."""
    return map(_bucket, values)


_bucket = partial(bisect_left, _EDGES)


def bucket_value(index: int) -> float:
    """Return the representative value of bucket *index*: within 1 % of each of its values."""
    if index <= 0:
        return MIN_VALUE
    key = min(index, _LAST) + _OFFSET
    return 2 * _GAMMA**key / (_GAMMA + 1)


#: The representative of every bucket, by index (what :func:`bucket_value` returns).
_VALUES = tuple(bucket_value(index) for index in range(BUCKETS))


@dataclass(eq=False)
class Sketch:
    """Bucket counts of a set of values, with their exact count and sum."""

    #: How many values of each bucket (only the buckets that hold any).
    buckets: dict[int, int] = field(default_factory=dict)
    #: How many values in all (the sum of :attr:`buckets`).
    count: int = 0
    #: The exact sum of the values, when known (``0.0`` for a window's sketch).
    total: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> Sketch:
        """Return the sketch of *values* (their buckets counted in C: :func:`buckets_of`).

        The total is added up in order, as :meth:`add` adds to it (``sum()`` compensates its
        rounding from Python 3.12 on, and would differ from it in the last bits)."""
        values = list(values)
        return cls(
            buckets=dict(Counter(buckets_of(values))), count=len(values), total=reduce(add, values, 0.0)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sketch):
            return NotImplemented
        return (self.count, self.total, self.buckets) == (other.count, other.total, other.buckets)

    def add(self, value: float, count: int = 1) -> None:
        """Add *count* times *value*."""
        index = bucket_of(value)
        self.buckets[index] = self.buckets.get(index, 0) + count
        self.count += count
        self.total += value * count

    def merge(self, other: Sketch) -> None:
        """Add every value of *other* to this sketch."""
        buckets = self.buckets
        for index, count in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + count
        self.count += other.count
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """Return the *q*-quantile (``0 <= q <= 1``), within 1 %, or ``None`` for no values.

        It is the representative of the bucket holding the value of rank ``q * (count - 1)``
        (the lower nearest rank), as DDSketch defines it.
        """
        return self.quantiles((q,))[q]

    def quantiles(self, qs: Iterable[float]) -> dict[float, float | None]:
        """Return :meth:`quantile` for each of *qs*, in one pass over the buckets."""
        wanted = tuple(qs)
        count = self.count
        if not count:
            return dict.fromkeys(wanted)
        keys = sorted(self.buckets)
        # Cumulative counts, in C: the bucket of rank r is the first whose cumulative count exceeds r.
        cumulative = list(accumulate(map(self.buckets.__getitem__, keys)))
        last = len(keys) - 1
        return {q: bucket_value(keys[min(bisect_right(cumulative, q * (count - 1)), last)]) for q in wanted}

    def to_json(self) -> dict[str, Any]:
        """Return the sketch as JSON-able data: ``{"count", "sum", "buckets": {index: count}}``."""
        return {
            "count": self.count,
            "sum": self.total,
            "buckets": {str(index): count for index, count in sorted(self.buckets.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sketch:
        """Return the sketch :meth:`to_json` described; raise :exc:`~django_scale.exceptions.MetricsDocumentError` if it is malformed."""
        try:
            buckets = {int(index): int(count) for index, count in dict(data["buckets"]).items()}
            count = int(data["count"])
            total = float(data.get("sum", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise MetricsDocumentError(f"not a sketch: {error}") from None
        if any(index < 0 or index >= BUCKETS or n < 0 for index, n in buckets.items()):
            raise MetricsDocumentError("not a sketch: a bucket index or count is out of range")
        if count != sum(buckets.values()):
            raise MetricsDocumentError("not a sketch: its count is not the sum of its buckets")
        return cls(buckets=buckets, count=count, total=total)


class DenseSketch(Sketch):
    """A sketch read from a run of consecutive bucket counts (what the shared store holds).

    Its count and quantiles come from the counts in C (one ``accumulate``, then a ``bisect``
    per quantile), without building :attr:`buckets`; the dict is built the first time
    something reads or changes it, and from then on it is the sketch's truth, as in a
    :class:`Sketch`.
    """

    def __init__(self, first: int, counts: array[int], total: float = 0.0) -> None:  # noqa: D107
        self._first = first
        self._counts = counts
        # The sum of the counts, kept; their running sums are not (an export would keep one
        # list per series, more memory than the counts themselves).
        self._sum: int | None = None
        self._buckets: dict[int, int] | None = None
        self._count: int | None = None
        self.total = total

    def _running(self) -> list[int]:
        cumulative = list(accumulate(self._counts)) or [0]
        self._sum = cumulative[-1]
        return cumulative

    def _indexes(self) -> Iterator[int]:
        """The buckets that hold values, in order (compress() keeps them in C)."""
        counts = self._counts
        return compress(range(self._first, self._first + len(counts)), counts)

    def to_json(self) -> dict[str, Any]:
        """Return :meth:`Sketch.to_json`, off the counts while no dict was built."""
        if self._buckets is not None or self._count is not None:
            return super().to_json()
        counts = self._counts
        return {
            "count": self.count,
            "sum": self.total,
            "buckets": dict(zip(map(str, self._indexes()), compress(counts, counts), strict=True)),
        }

    @property
    def buckets(self) -> dict[int, int]:
        """The counts as ``{bucket: count}`` (only the buckets that hold any)."""
        if self._buckets is None:
            self._buckets = dict(zip(self._indexes(), compress(self._counts, self._counts), strict=True))
            self._count = self.count
        return self._buckets

    @buckets.setter
    def buckets(self, value: dict[int, int]) -> None:
        self._buckets = value

    @property
    def count(self) -> int:
        """How many values in all."""
        if self._count is None:
            if self._sum is None:
                self._sum = sum(self._counts)
            return self._sum
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._count = value

    def quantiles(self, qs: Iterable[float]) -> dict[float, float | None]:
        """Return :meth:`Sketch.quantile` for each of *qs*, off the counts as they were read."""
        if self._buckets is not None or self._count is not None:
            return super().quantiles(qs)
        wanted = tuple(qs)
        cumulative = self._running()
        count = cumulative[-1]
        if not count:
            return dict.fromkeys(wanted)
        # The bucket of rank r is the first whose cumulative count exceeds r: a bucket without
        # values never is, so this is the lower nearest rank Sketch.quantiles finds.
        first = self._first
        return {q: _VALUES[first + bisect_right(cumulative, q * (count - 1))] for q in wanted}
