"""The one ``DJANGO_SCALE`` setting, read lazily through :data:`conf`.

Every property reads ``settings.DJANGO_SCALE`` at the time it is accessed, never at import,
so :func:`django.test.override_settings` and
:func:`django_scale.testing.override_scale_settings` take effect at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from django.conf import settings
from django.core.signals import setting_changed

from django_scale.conf import definitions
from django_scale.conf.definitions import Setting, count_problem, seconds_problem
from django_scale.exceptions import ConfigurationError, UnknownSettingError

__all__ = ["SETTINGS", "HotSettings", "Setting", "conf", "count_problem", "seconds_problem"]

#: Every key of ``DJANGO_SCALE`` with its default. ``docs/settings.md`` documents each one.
#:
#: :meta hide-value:
SETTINGS: dict[str, Setting] = definitions.SETTINGS


@dataclass(frozen=True, slots=True)
class HotSettings:
    """The values of ``DJANGO_SCALE`` that every request reads, in one object (:meth:`Conf.hot`)."""

    primary: str
    replicas: tuple[str, ...]
    #: REPLICA_DEADLINE, HEALTH_CHECK_INTERVAL and MAX_REPLICA_LAG.
    deadline: float
    interval: float
    max_lag: float
    #: READ_YOUR_WRITES_COOKIE.
    cookie: str
    #: PRIMARY_METHODS: the methods of requests whose reads all go to the primary.
    primary_methods: frozenset[str]
    #: REPLICA_POLICY and REPLICA_WEIGHTS.
    policy: str
    weights: Mapping[str, float]
    #: METRICS_DIR (or its default), METRICS_SLOTS, METRICS_SERIES and METRICS_MEMORY.
    metrics: tuple[str, int, int, int]


class Conf:
    """Typed, lazy access to ``settings.DJANGO_SCALE`` with documented defaults."""

    def __init__(self) -> None:
        #: Bumped by Django's ``setting_changed`` signal for ``DJANGO_SCALE``.
        self._generation = 0
        # What the request path reads, and the generation it was computed in.
        self._hot: tuple[int, HotSettings | None] = (-1, None)

    def hot(self) -> HotSettings:
        """Return the settings the request path reads, computed once until ``DJANGO_SCALE`` changes.

        Django's ``setting_changed`` signal, which ``override_settings`` (and so
        :func:`~django_scale.testing.override_scale_settings` and pytest-django's ``settings``
        fixture) sends, makes the next call compute them again: no read of
        ``django.conf.settings`` per call, whose proxy runs Python code on every attribute.
        (Django's settings are not changed at run time outside tests; an assignment to
        ``settings.DJANGO_SCALE`` that sends no signal, or a dict mutated in place, is not
        noticed.)
        """
        cached = self._hot
        if cached[0] == self._generation:
            return cached[1]  # type: ignore[return-value]
        # Read before computing: a change signalled meanwhile leaves this one stale at once.
        generation = self._generation
        value = HotSettings(
            primary=self.PRIMARY,
            replicas=self.REPLICAS,
            deadline=self.REPLICA_DEADLINE,
            interval=self.HEALTH_CHECK_INTERVAL,
            max_lag=self.MAX_REPLICA_LAG,
            cookie=self.READ_YOUR_WRITES_COOKIE,
            primary_methods=self.PRIMARY_METHODS,
            policy=self.REPLICA_POLICY,
            weights=self.REPLICA_WEIGHTS,
            metrics=(
                self.METRICS_DIR
                or os.path.join(
                    tempfile.gettempdir(),
                    f"django-scale-metrics-{os.getuid() if hasattr(os, 'getuid') else 'user'}",
                ),
                self.METRICS_SLOTS,
                self.METRICS_SERIES,
                self.METRICS_MEMORY,
            ),
        )
        self._hot = (generation, value)
        return value

    def forget_hot(self) -> None:
        """Have the next :meth:`hot` compute the settings again (``DJANGO_SCALE`` changed)."""
        self._generation += 1

    def aliases(self) -> tuple[str, tuple[str, ...]]:
        """Return ``(PRIMARY, REPLICAS)`` (once per settings object, as :meth:`hot` is)."""
        hot = self.hot()
        return hot.primary, hot.replicas

    def health_limits(self) -> tuple[float, float, float]:
        """Return ``(REPLICA_DEADLINE, HEALTH_CHECK_INTERVAL, MAX_REPLICA_LAG)`` (as :meth:`hot` is)."""
        hot = self.hot()
        return hot.deadline, hot.interval, hot.max_lag

    def replica_policy(self) -> tuple[str, Mapping[str, float]]:
        """Return ``(REPLICA_POLICY, REPLICA_WEIGHTS)`` (once per settings object, as :meth:`hot` is)."""
        hot = self.hot()
        return hot.policy, hot.weights

    def metrics_options(self) -> tuple[str, int, int, int]:
        """Return ``(METRICS_DIR, METRICS_SLOTS, METRICS_SERIES, METRICS_MEMORY)`` (as :meth:`hot` is)."""
        return self.hot().metrics

    def user_settings(self) -> Mapping[str, Any]:
        """Return the ``DJANGO_SCALE`` dict as the project set it (empty when unset)."""
        value = getattr(settings, "DJANGO_SCALE", None)
        if value is None:
            return {}
        if not isinstance(value, (dict, Mapping)):
            raise ConfigurationError(
                f"The DJANGO_SCALE setting must be a dict, not {type(value).__name__}. "
                'Set it to a dict, for example DJANGO_SCALE = {"REPLICAS": ["replica"]}.'
            )
        return value

    def get(self, name: str) -> Any:
        """Return the value of key *name*: the project's, or the documented default."""
        if name not in SETTINGS:
            raise UnknownSettingError(
                f"{name!r} is not a DJANGO_SCALE key. Known keys: {', '.join(sorted(SETTINGS))}."
            )
        return self.user_settings().get(name, SETTINGS[name].default)

    @property
    def PRIMARY(self) -> str:
        """The alias of the primary (writable) database. Default: ``"default"``."""
        return cast(str, self.get("PRIMARY"))

    @property
    def REPLICAS(self) -> tuple[str, ...]:
        """The aliases of the read replicas, in order of preference. Default: none."""
        return tuple(self.get("REPLICAS"))

    @property
    def MAX_REPLICA_LAG(self) -> float:
        """Seconds of replication lag past which a replica takes no reads. Default: ``5.0``."""
        return float(self.get("MAX_REPLICA_LAG"))

    @property
    def REPLICA_WAIT(self) -> float:
        """Seconds a read may wait for a replica to replay a user's own write. Default: ``0.01``."""
        return float(self.get("REPLICA_WAIT"))

    @property
    def READ_YOUR_WRITES_MAX_AGE(self) -> float:
        """Seconds a user's write keeps steering their reads. Default: ``30.0``."""
        return float(self.get("READ_YOUR_WRITES_MAX_AGE"))

    @property
    def READ_YOUR_WRITES_COOKIE(self) -> str:
        """The signed cookie that carries a user's last write position. Default: ``"django_scale_lsn"``."""
        return cast(str, self.get("READ_YOUR_WRITES_COOKIE"))

    @property
    def PRIMARY_METHODS(self) -> frozenset[str]:
        """Methods of requests whose reads all go to the primary. Default: ``POST``, ``PUT``, ``PATCH``, ``DELETE``."""
        return frozenset(self.get("PRIMARY_METHODS"))

    @property
    def REPLICA_DEADLINE(self) -> float:
        """Client-side deadline, in seconds, for a replica health probe. Default: ``1.0``."""
        return float(self.get("REPLICA_DEADLINE"))

    @property
    def HEALTH_CHECK_INTERVAL(self) -> float:
        """Seconds between two health probes of a replica, per process. Default: ``0.5``."""
        return float(self.get("HEALTH_CHECK_INTERVAL"))

    @property
    def PRIMARY_FALLBACK_CAP(self) -> float:
        """Largest share of free reads that may fall back to the primary. Default: ``1.0`` (no cap)."""
        return float(self.get("PRIMARY_FALLBACK_CAP"))

    @property
    def REPLICA_RETRY_AFTER(self) -> float:
        """Seconds an ejected (unreachable) replica stays out before it is tried again. Default: ``5.0``."""
        return float(self.get("REPLICA_RETRY_AFTER"))

    @property
    def REPLICA_POLICY(self) -> str:
        """How reads spread over several available replicas. Default: ``"random"``."""
        return cast(str, self.get("REPLICA_POLICY"))

    @property
    def REPLICA_WEIGHTS(self) -> Mapping[str, float]:
        """Each replica's share of reads under the ``"weighted"`` policy (missing: 1). Default: ``{}``."""
        return cast("Mapping[str, float]", self.get("REPLICA_WEIGHTS"))

    @property
    def SHARED_HEALTH(self) -> bool:
        """Whether one process per host probes each replica for all of that host's processes. Default: ``True``."""
        return bool(self.get("SHARED_HEALTH"))

    @property
    def SHARED_HEALTH_DIR(self) -> str:
        """Where a host's processes share replica health (files). Default: ``""`` (under the temporary directory)."""
        return cast(str, self.get("SHARED_HEALTH_DIR"))

    @property
    def CACHE_ALIAS(self) -> str:
        """The cache that holds django-scale's shared state. Default: ``"default"``."""
        return cast(str, self.get("CACHE_ALIAS"))

    @property
    def QUERY_CACHE(self) -> bool:
        """Whether writes are tracked and ``.cached()`` querysets use the query cache. Default: ``False``."""
        return bool(self.get("QUERY_CACHE"))

    @property
    def N_PLUS_ONE(self) -> Literal["off", "log", "warn", "raise"]:
        """How N+1 queries are reported outside :func:`~django_scale.prefetch.detect_n_plus_one`. Default: ``"off"``."""
        return cast(Literal["off", "log", "warn", "raise"], self.get("N_PLUS_ONE"))

    @property
    def N_PLUS_ONE_SAMPLE_RATE(self) -> float:
        """The share of N+1 findings logged when ``N_PLUS_ONE`` is ``"log"``. Default: ``1.0``."""
        return float(self.get("N_PLUS_ONE_SAMPLE_RATE"))

    @property
    def SNIPER_RULES(self) -> tuple[Mapping[str, Any], ...]:
        """The query sniper's rules, as dicts (see ``django_scale.sniper.Rule``)."""
        return tuple(self.get("SNIPER_RULES"))

    @property
    def SNIPER_DATABASES(self) -> tuple[str, ...]:
        """The aliases the sniper watches. Default: none set, meaning PRIMARY and REPLICAS."""
        return tuple(self.get("SNIPER_DATABASES")) or (self.PRIMARY, *self.REPLICAS)

    @property
    def SNIPER_GRACE(self) -> float:
        """Seconds after a cancel before the sniper terminates the backend. Default: ``10.0``."""
        return float(self.get("SNIPER_GRACE"))

    @property
    def SNIPER_KILL_BUDGET(self) -> int:
        """Most backends the sniper signals in one run, over all its databases. Default: ``10``."""
        return int(self.get("SNIPER_KILL_BUDGET"))

    @property
    def SNIPER_ALLOW_APPLICATIONS(self) -> tuple[str, ...]:
        """``application_name`` patterns the sniper never signals. Default: pg_dump, pg_restore, pg_basebackup."""
        return tuple(self.get("SNIPER_ALLOW_APPLICATIONS"))

    @property
    def SNIPER_DRY_RUN(self) -> bool:
        """Whether the sniper only reports what it would kill. Default: ``False``."""
        return bool(self.get("SNIPER_DRY_RUN"))

    @property
    def SNIPER_MAIL_ADMINS(self) -> bool:
        """Whether each kill is mailed to ``ADMINS``. Default: ``False``."""
        return bool(self.get("SNIPER_MAIL_ADMINS"))

    @property
    def CACHE_RETRY_AFTER(self) -> float:
        """Seconds an unreachable cache or Celery broker is skipped before it is tried again. Default: ``5.0``."""
        return float(self.get("CACHE_RETRY_AFTER"))

    @property
    def POOLER(self) -> Mapping[str, str]:
        """How each alias is pooled: ``"transaction"`` (PgBouncer's transaction mode) or
        ``"session"`` (a direct connection or session pooling, the default for every alias).
        """
        return cast("Mapping[str, str]", self.get("POOLER"))

    def transaction_pooled(self, alias: str) -> bool:
        """Return whether *alias* reaches PostgreSQL through a transaction pooler (``POOLER``)."""
        return self.POOLER.get(alias) == "transaction"

    @property
    def SWR_FRESH(self) -> float:
        """Default ``fresh`` of ``stale_while_revalidate``, in seconds. Default: ``60.0``."""
        return float(self.get("SWR_FRESH"))

    @property
    def SWR_STALE(self) -> float:
        """Default ``stale`` of ``stale_while_revalidate``, in seconds. Default: ``3600.0``."""
        return float(self.get("SWR_STALE"))

    @property
    def SLOW_QUERY_MS(self) -> float:
        """Milliseconds from which the slow-query log records a statement. Default: ``100.0``."""
        return float(self.get("SLOW_QUERY_MS"))

    @property
    def SLOW_QUERY_DATABASES(self) -> tuple[str, ...]:
        """The aliases whose statements the slow-query log times. Default: every alias."""
        return tuple(self.get("SLOW_QUERY_DATABASES"))

    @property
    def SLOW_QUERY_TOP(self) -> int:
        """How many statements (by total time) the slow-query log keeps. Default: ``200``."""
        return int(self.get("SLOW_QUERY_TOP"))

    @property
    def SLOW_QUERY_REDACT(self) -> bool:
        """Whether the slow-query log drops the parameters of its examples. Default: ``False``."""
        return bool(self.get("SLOW_QUERY_REDACT"))

    @property
    def METRICS_DIR(self) -> str:
        """The directory of the host's shared metrics file. Default: ``""`` (the temporary directory)."""
        return cast(str, self.get("METRICS_DIR"))

    @property
    def METRICS_SLOTS(self) -> int:
        """Worker slots in the metrics file: at least the processes that record at once. Default: ``32``."""
        return int(self.get("METRICS_SLOTS"))

    @property
    def METRICS_SERIES(self) -> int:
        """Timing series (route, method, kind, alias) the file holds; counters get four times as many. Default: ``1024``."""
        return int(self.get("METRICS_SERIES"))

    @property
    def METRICS_MEMORY(self) -> int:
        """Megabytes of bucket memory per worker slot. Default: ``16``."""
        return int(self.get("METRICS_MEMORY"))

    @property
    def METRICS_BATCH(self) -> int:
        """Requests a process writes to the metrics store at once (at most a second apart). Default: ``32``."""
        return int(self.get("METRICS_BATCH"))

    @property
    def METRICS_TOKEN(self) -> str:
        """The bearer token that may read ``/scale/`` besides staff users. Default: ``""`` (staff only)."""
        return cast(str, self.get("METRICS_TOKEN"))


#: The one instance to read settings through: ``from django_scale.conf import conf``.
#:
#: :meta hide-value:
conf = Conf()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "DJANGO_SCALE":
        conf.forget_hot()


setting_changed.connect(_setting_changed, dispatch_uid="django_scale.conf.hot")
