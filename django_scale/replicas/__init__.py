"""Where reads may go (moved to a package; split into modules in the next commit)."""

from __future__ import annotations

from django_scale.replicas.monitor import *  # noqa: F403
from django_scale.replicas.monitor import (  # noqa: F401
    __all__,
    _capture,
    _forced,
    _state,
    error_sqlstate,
    forced_route,
    free_read_alias,
    pick_usable,
    stop_monitors,
    watchdog,
    Watchdog,
)
