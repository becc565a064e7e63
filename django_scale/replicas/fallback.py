"""The per-second window that caps the share of free reads falling back to the primary."""

from __future__ import annotations

__all__ = ["FallbackWindow", "fallback_window"]


class FallbackWindow:
    """Counts, per second and per process, the free reads and those that fell back to the primary.

    A free read has no read-your-writes requirement; the replicas serve it unless none is
    available. When ``PRIMARY_FALLBACK_CAP`` is below 1, at most that share of a second's free
    reads may go to the primary; the rest go to a replica that is reachable but lags, so
    that lagging replicas cannot move the whole read load onto the primary at once.
    """

    def __init__(self) -> None:
        #: When the current second ends (``time.monotonic()``): a read after it starts the next
        #: second's counts. (A boundary compared as a float: no int() per read.)
        self.ends = 0.0
        self.reads = 0
        self.fallbacks = 0
        #: Free reads served by a lagging replica because of the cap (for tests and metrics).
        self.capped = 0

    def count_read(self, now: float) -> None:
        if now >= self.ends:
            self.ends, self.reads, self.fallbacks = int(now) + 1.0, 0, 0
        self.reads += 1

    def may_fall_back(self, cap: float) -> bool:
        if cap >= 1.0 or self.fallbacks + 1 <= cap * self.reads:
            self.fallbacks += 1
            return True
        return False


#: The process's :class:`FallbackWindow`.
fallback_window = FallbackWindow()
