"""Where reads may go: the routing state of a request, and the health of each replica.

The parts, one concept each:

* :mod:`~django_scale.replicas.state`: :class:`RoutingState`, one per request (or Celery
  task), kept in a :mod:`contextvars` variable so that threads and async tasks never see each
  other's, and :func:`use_primary` / :func:`use_replica`.
* :mod:`~django_scale.replicas.wal`: WAL positions and the read-your-writes cookie's value.
* :mod:`~django_scale.replicas.monitors`: :class:`ReplicaMonitor`, one per replica per
  process, whose thread probes its replica on a connection of its own. A routing decision
  only reads what the monitors recorded: it does no I/O.
* :mod:`~django_scale.replicas.health`: :class:`SharedHealth`, which tells the other
  processes through the cache which replicas this one ejected, and learns theirs.
* :mod:`~django_scale.replicas.hostshare`: one prober per replica per host (``SHARED_HEALTH``),
  publishing into a memory-mapped record the host's other processes copy instead of probing.
* :mod:`~django_scale.replicas.policy`: which of several available replicas a request reads
  from (``REPLICA_POLICY``).
* :mod:`~django_scale.replicas.guard`: :class:`ReplicaGuard` and the watchdog: a deadline
  for queries on a replica, and a clear error when a read on one fails.
* :mod:`~django_scale.replicas.errors`: what a failed query's SQLSTATE says.
* :mod:`~django_scale.replicas.fallback`: the window that caps reads falling back to the
  primary.

Which replica a read goes to is :class:`~django_scale.routers.ReplicaRouter`'s policy.
"""

from __future__ import annotations

from django_scale.replicas import wal
from django_scale.replicas.errors import error_sqlstate
from django_scale.replicas.fallback import FallbackWindow
from django_scale.replicas.guard import ReplicaGuard, Watchdog, install_guards
from django_scale.replicas.health import SharedHealth, shared_health
from django_scale.replicas.monitors import ReplicaMonitor, monitor, stop_monitors, wait_for_replicas
from django_scale.replicas.state import (
    RoutingState,
    await_replica,
    current_state,
    forced_route,
    mark_write,
    routing_state,
    use_primary,
    use_replica,
)
from django_scale.replicas.wal import decode_position, format_lsn, parse_lsn

__all__ = [
    "STICKY_PRIMARY",
    "FallbackWindow",
    "ReplicaGuard",
    "ReplicaMonitor",
    "RoutingState",
    "SharedHealth",
    "Watchdog",
    "await_replica",
    "current_state",
    "decode_position",
    "error_sqlstate",
    "forced_route",
    "format_lsn",
    "install_guards",
    "mark_write",
    "monitor",
    "parse_lsn",
    "routing_state",
    "shared_health",
    "stop_monitors",
    "use_primary",
    "use_replica",
    "wait_for_replicas",
]

#: The value of a read-your-writes cookie or task header that means "read from the primary":
#: the user wrote, but the primary has no WAL position to wait for.
STICKY_PRIMARY = wal.STICKY_PRIMARY
