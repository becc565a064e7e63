"""The one ``DJANGO_SCALE`` setting, read lazily through :data:`conf`.

Every property reads ``settings.DJANGO_SCALE`` at the time it is accessed, never at import,
so :func:`django.test.override_settings` and
:func:`django_scale.testing.override_scale_settings` take effect at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from django.conf import settings

from django_scale.exceptions import ConfigurationError, UnknownSettingError

__all__ = ["SETTINGS", "Setting", "conf", "count_problem", "seconds_problem"]


@dataclass(frozen=True)
class Setting:
    """One key of ``DJANGO_SCALE``: its default and how to tell a valid value."""

    #: The value used when the key is absent.
    default: Any
    #: What the value must be, in words, for error messages ("a number of seconds").
    expected: str
    #: Whether the value has the right type.
    has_type: Callable[[Any], bool]
    #: Why a value of the right type is still not allowed, or ``None`` when it is allowed.
    problem: Callable[[Any], str | None] = lambda value: None
    #: An example of a valid value, for the hint of a check message.
    example: str = ""


def _is_alias(value: Any) -> bool:
    return isinstance(value, str)


def _is_alias_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True seconds is a mistake, not a duration.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _is_rule_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, Mapping) for item in value)


def _empty_alias(value: str) -> str | None:
    return "it is empty" if not value else None


def _duplicate_aliases(value: Sequence[str]) -> str | None:
    duplicates = sorted({alias for alias in value if list(value).count(alias) > 1})
    if duplicates:
        return f"it lists {', '.join(repr(alias) for alias in duplicates)} more than once"
    if "" in value:
        return "it contains an empty alias"
    return None


def _negative(value: float) -> str | None:
    return "it must not be negative" if value < 0 else None


def _not_a_fraction(value: float) -> str | None:
    return "it must be between 0 and 1" if not 0 <= value <= 1 else None


def _not_a_mode(value: str) -> str | None:
    modes = ("off", "log", "warn", "raise")
    return None if value in modes else f"it must be one of {', '.join(repr(mode) for mode in modes)}"


def _not_positive(value: float) -> str | None:
    return "it must be greater than zero" if value <= 0 else None


def _not_a_positive_count(value: int) -> str | None:
    return "it must be at least 1" if value < 1 else None


def seconds_problem(value: Any, *, zero_allowed: bool = False) -> str | None:
    """Return why *value* is not a valid number of seconds (``"it must be greater than zero"``).

    Return ``None`` for a valid one: an ``int`` or ``float`` (not a ``bool``), greater than zero
    or, if *zero_allowed*, not negative. The one validator of durations: settings, decorator
    arguments and template tags all use it.
    """
    if not _is_number(value):
        return "it must be a number of seconds (int or float)"
    if value != value:
        return "it must be a number of seconds, not NaN"
    return _negative(value) if zero_allowed else _not_positive(value)


def count_problem(value: Any) -> str | None:
    """Return why *value* is not a valid count (``"it must be at least 1"``), or ``None``.

    A valid count is an ``int`` (not a ``bool``) of at least 1: batch sizes, kills per run.
    """
    if not _is_count(value):
        return "it must be a whole number (int)"
    return _not_a_positive_count(value)


def _seconds(default: float, *, zero_allowed: bool = False) -> Setting:
    """A duration key: a number of seconds, greater than zero (or, if allowed, zero)."""
    return Setting(
        default=default,
        expected="a number of seconds (int or float)",
        has_type=_is_number,
        problem=_negative if zero_allowed else _not_positive,
        example=repr(default),
    )


#: Every key of ``DJANGO_SCALE`` with its default. ``docs/settings.md`` documents each one.
#:
#: :meta hide-value:
SETTINGS: dict[str, Setting] = {
    "PRIMARY": Setting(
        default="default",
        expected="a database alias (str)",
        has_type=_is_alias,
        problem=_empty_alias,
        example='"default"',
    ),
    "REPLICAS": Setting(
        default=(),
        expected="a list of database aliases",
        has_type=_is_alias_list,
        problem=_duplicate_aliases,
        example='["replica1", "replica2"]',
    ),
    "MAX_REPLICA_LAG": _seconds(5.0),
    "REPLICA_WAIT": _seconds(0.01, zero_allowed=True),
    "READ_YOUR_WRITES_MAX_AGE": _seconds(30.0),
    "READ_YOUR_WRITES_COOKIE": Setting(
        default="django_scale_lsn",
        expected="a cookie name (str)",
        has_type=_is_alias,
        problem=_empty_alias,
        example='"django_scale_lsn"',
    ),
    "REPLICA_DEADLINE": _seconds(1.0),
    "HEALTH_CHECK_INTERVAL": _seconds(0.5),
    "PRIMARY_FALLBACK_CAP": Setting(
        default=1.0,
        expected="a fraction of reads between 0 and 1 (int or float)",
        has_type=_is_number,
        problem=_not_a_fraction,
        example="0.25",
    ),
    "REPLICA_RETRY_AFTER": _seconds(5.0),
    "CACHE_ALIAS": Setting(
        default="default",
        expected="a cache alias (str)",
        has_type=_is_alias,
        problem=_empty_alias,
        example='"default"',
    ),
    "N_PLUS_ONE": Setting(
        default="off",
        expected='one of "off", "log", "warn", "raise" (str)',
        has_type=lambda value: isinstance(value, str),
        problem=_not_a_mode,
        example='"log"',
    ),
    "N_PLUS_ONE_SAMPLE_RATE": Setting(
        default=1.0,
        expected="a fraction of findings between 0 and 1 (int or float)",
        has_type=_is_number,
        problem=_not_a_fraction,
        example="0.01",
    ),
    "SNIPER_RULES": Setting(
        default=(
            {"name": "long query", "max_duration": 30.0},
            {
                "name": "idle in transaction",
                "states": ["idle in transaction", "idle in transaction (aborted)"],
                "max_duration": 60.0,
            },
        ),
        expected="a list of rule dicts",
        has_type=_is_rule_list,
        example='[{"name": "long query", "max_duration": 30}]',
    ),
    "SNIPER_DATABASES": Setting(
        default=(),
        expected="a list of database aliases",
        has_type=_is_alias_list,
        problem=_duplicate_aliases,
        example='["default", "replica1"]',
    ),
    "SNIPER_GRACE": _seconds(10.0, zero_allowed=True),
    "SNIPER_KILL_BUDGET": Setting(
        default=10,
        expected="a number of kills per run (int)",
        has_type=_is_count,
        problem=_not_a_positive_count,
        example="10",
    ),
    "SNIPER_ALLOW_APPLICATIONS": Setting(
        default=("pg_dump", "pg_restore", "pg_basebackup"),
        expected="a list of application_name patterns (str)",
        has_type=_is_name_list,
        example='["pg_dump", "backup-*"]',
    ),
    "SNIPER_DRY_RUN": Setting(
        default=False,
        expected="True or False",
        has_type=_is_bool,
        example="True",
    ),
    "SNIPER_MAIL_ADMINS": Setting(
        default=False,
        expected="True or False",
        has_type=_is_bool,
        example="True",
    ),
    "CACHE_RETRY_AFTER": _seconds(5.0),
    "SWR_FRESH": _seconds(60.0),
    "SWR_STALE": _seconds(3600.0),
    "METRICS_DIR": Setting(
        default="",
        expected="a directory path (str)",
        has_type=lambda value: isinstance(value, str),
        example='"/run/django-scale"',
    ),
    "METRICS_SLOTS": Setting(
        default=32,
        expected="a number of worker slots (int)",
        has_type=_is_count,
        problem=lambda value: None if 1 <= value <= 4096 else "it must be between 1 and 4096",
        example="32",
    ),
    "METRICS_SERIES": Setting(
        default=1024,
        expected="a number of timing series (int)",
        has_type=_is_count,
        problem=lambda value: None if 1 <= value <= 65536 else "it must be between 1 and 65536",
        example="1024",
    ),
    "METRICS_MEMORY": Setting(
        default=16,
        expected="megabytes of buckets per worker slot (int)",
        has_type=_is_count,
        problem=lambda value: None if 1 <= value <= 1024 else "it must be between 1 and 1024",
        example="16",
    ),
    "METRICS_TOKEN": Setting(
        default="",
        expected="a secret token (str)",
        has_type=lambda value: isinstance(value, str),
        problem=lambda value: (
            "it must be empty (no token) or at least 32 characters long" if 0 < len(value) < 32 else None
        ),
        example='"<a random string of 32+ characters>"',
    ),
}


class Conf:
    """Typed, lazy access to ``settings.DJANGO_SCALE`` with documented defaults."""

    def __init__(self) -> None:
        # What the routing hot path reads, computed once per DJANGO_SCALE object.
        self._hot: tuple[object, dict[str, Any]] = (object(), {})

    def _per_settings_object(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return ``compute()``, computed once per ``DJANGO_SCALE`` object, for hot paths.

        ``override_settings`` and :func:`~django_scale.testing.override_scale_settings` install
        a new object, so they take effect at once. (Mutating the dict in place is not noticed;
        override it.)
        """
        raw = getattr(settings, "DJANGO_SCALE", None)
        cached = self._hot
        if cached[0] is not raw:
            cached = self._hot = (raw, {})
        values = cached[1]
        try:
            return values[key]
        except KeyError:
            value = values[key] = compute()
            return value

    def aliases(self) -> tuple[str, tuple[str, ...]]:
        """Return ``(PRIMARY, REPLICAS)`` for the router's hot path (once per settings object)."""
        return cast(
            "tuple[str, tuple[str, ...]]",
            self._per_settings_object("aliases", lambda: (self.PRIMARY, self.REPLICAS)),
        )

    def health_limits(self) -> tuple[float, float, float]:
        """Return ``(REPLICA_DEADLINE, HEALTH_CHECK_INTERVAL, MAX_REPLICA_LAG)`` for the hot path.

        Computed once per settings object, as :meth:`aliases` is.
        """
        return cast(
            "tuple[float, float, float]",
            self._per_settings_object(
                "health_limits",
                lambda: (self.REPLICA_DEADLINE, self.HEALTH_CHECK_INTERVAL, self.MAX_REPLICA_LAG),
            ),
        )

    def metrics_options(self) -> tuple[str, int, int, int]:
        """Return ``(METRICS_DIR, METRICS_SLOTS, METRICS_SERIES, METRICS_MEMORY)``, once per settings object."""

        def compute() -> tuple[str, int, int, int]:
            default = os.path.join(tempfile.gettempdir(), f"django-scale-metrics-{os.getuid()}")
            directory = self.METRICS_DIR or default
            return (directory, self.METRICS_SLOTS, self.METRICS_SERIES, self.METRICS_MEMORY)

        return cast("tuple[str, int, int, int]", self._per_settings_object("metrics", compute))

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
    def CACHE_ALIAS(self) -> str:
        """The cache that holds django-scale's shared state. Default: ``"default"``."""
        return cast(str, self.get("CACHE_ALIAS"))

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
    def SWR_FRESH(self) -> float:
        """Default ``fresh`` of ``stale_while_revalidate``, in seconds. Default: ``60.0``."""
        return float(self.get("SWR_FRESH"))

    @property
    def SWR_STALE(self) -> float:
        """Default ``stale`` of ``stale_while_revalidate``, in seconds. Default: ``3600.0``."""
        return float(self.get("SWR_STALE"))

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
    def METRICS_TOKEN(self) -> str:
        """The bearer token that may read ``/scale/`` besides staff users. Default: ``""`` (staff only)."""
        return cast(str, self.get("METRICS_TOKEN"))


#: The one instance to read settings through: ``from django_scale.conf import conf``.
#:
#: :meta hide-value:
conf = Conf()
