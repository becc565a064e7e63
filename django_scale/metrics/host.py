"""A host's metrics as read from its file (:meth:`~django_scale.metrics.store.SlotStore.snapshot`).

What export, merging and the status page read: every worker slot summed, or hosts merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django_scale.metrics.sketch import Sketch

__all__ = ["HostSnapshot"]


@dataclass
class HostSnapshot:
    """What every slot of a host's file holds, summed: the input of export and merging."""

    #: Minute (``time() // 60``) the snapshot was read at.
    minute: int
    #: Per timing series name: its sketch over each window (minutes), count and sum exact.
    windows: dict[str, dict[int, Sketch]] = field(default_factory=dict)
    #: Per timing series name: ``(count, sum)`` since the file was created (never goes down).
    totals: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: Per counter series name: its value since the file was created (never goes down).
    counters: dict[str, int] = field(default_factory=dict)
    #: Slots held by a live process, and slots ever claimed.
    live_slots: int = 0
    used_slots: int = 0
    #: Values dropped: no free slot, or a slot's bucket pool full (see ``METRICS_MEMORY``).
    dropped: int = 0
    #: The sniper's recent kills, newest first (:mod:`~django_scale.metrics.kills`).
    kills: list[dict[str, Any]] = field(default_factory=list)
