"""Which of several available replicas a request reads from: ``REPLICA_POLICY``.

The router first keeps the replicas that may take the read (healthy, lag under
``MAX_REPLICA_LAG``, the user's last write replayed); :func:`order_replicas` then puts them in
the order the router tries them, and the first whose connection opens serves the request (and
the rest of its reads). It reads what the monitors recorded, in memory: no I/O.

``"random"`` (the default)
    Uniformly at random: load spreads evenly over replicas of equal size.
``"round_robin"``
    In turn, per process: each request starts one replica further along ``REPLICAS``.
``"least_lag"``
    The replicas whose lag is within one ``HEALTH_CHECK_INTERVAL`` of the least lag, at random:
    a lagging replica takes reads only when the others are gone, while equally caught-up
    replicas still share the load (lag is only measured to about one probe interval).
``"weighted"``
    At random in proportion to ``REPLICA_WEIGHTS`` (an alias missing there weighs 1): for
    replicas of different sizes. A weight of 0 takes reads only when no other replica can.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping

from django_scale.conf import conf
from django_scale.replicas.monitors import monitor

__all__ = ["POLICIES", "order_replicas"]

#: The values ``REPLICA_POLICY`` may take.
POLICIES = ("random", "round_robin", "least_lag", "weighted")

# Per process; next() on itertools.count is atomic under the GIL.
_turns = itertools.count()


def order_replicas(aliases: list[str]) -> list[str]:
    """Return *aliases* (available replicas) in the order a request tries them (no I/O)."""
    if len(aliases) < 2:
        return aliases
    policy, weights = conf.replica_policy()
    if policy == "round_robin":
        start = next(_turns) % len(aliases)
        return aliases[start:] + aliases[:start]
    if policy == "least_lag":
        return _least_lag(aliases)
    if policy == "weighted":
        return _weighted(aliases, weights)
    shuffled = list(aliases)
    random.shuffle(shuffled)
    return shuffled


def _least_lag(aliases: list[str]) -> list[str]:
    lags = {alias: monitor(alias).lag for alias in aliases}
    known = [lag for lag in lags.values() if lag is not None]
    least = min(known) if known else 0.0
    tolerance = conf.health_limits()[1]
    near = [alias for alias in aliases if (lags[alias] or 0.0) <= least + tolerance]
    random.shuffle(near)
    rest = sorted(
        (alias for alias in aliases if alias not in near), key=lambda alias: lags[alias] or math.inf
    )
    return near + rest


def _weighted(aliases: list[str], weights: Mapping[str, float]) -> list[str]:
    # Weighted random order without replacement (Efraimidis and Spirakis): each alias draws
    # u ** (1 / weight) and the largest goes first, so the first is alias i with probability
    # weight_i / sum(weights). A weight of 0 draws 0 and goes last.
    def key(alias: str) -> float:
        weight = float(weights.get(alias, 1.0))
        return random.random() ** (1.0 / weight) if weight > 0 else -1.0

    return sorted(aliases, key=key, reverse=True)
