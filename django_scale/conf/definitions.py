"""The keys of the ``DJANGO_SCALE`` setting: their defaults and the one set of validators.

:data:`django_scale.conf.conf` reads the values; the settings checks report what these
validators find.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["POOL_MODES", "SETTINGS", "Setting", "count_problem", "seconds_problem"]


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


def _is_method_set(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(item, str) for item in value)


def _not_method_names(value: Any) -> str | None:
    wrong = sorted(
        item for item in value if not item or not item.isascii() or not item.isalpha() or not item.isupper()
    )
    if wrong:
        return f"{', '.join(map(repr, wrong))} is not an upper-case HTTP method name"
    return None


def _is_pooler_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(key, str) for key in value)


#: What ``DJANGO_SCALE["POOLER"]`` may say of an alias's connections.
POOL_MODES = ("transaction", "session")


def _not_pool_modes(value: Mapping[str, Any]) -> str | None:
    wrong = {alias: mode for alias, mode in value.items() if mode not in POOL_MODES}
    if wrong:
        alias, mode = next(iter(wrong.items()))
        return f"the mode of {alias!r} is {mode!r}; it must be one of {', '.join(map(repr, POOL_MODES))}"
    return None


def _empty_alias(value: str) -> str | None:
    return "it is empty" if not value else None


def _duplicate_aliases(value: Sequence[str]) -> str | None:
    duplicates = sorted({alias for alias in value if list(value).count(alias) > 1})
    if duplicates:
        return f"it lists {', '.join(repr(alias) for alias in duplicates)} more than once"
    if "" in value:
        return "it contains an empty alias"
    return None


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and _is_number(weight) for key, weight in value.items()
    )


def _bad_weights(value: Mapping[str, float]) -> str | None:
    negative = sorted(alias for alias, weight in value.items() if not weight >= 0)
    if negative:
        return f"the weight of {', '.join(repr(alias) for alias in negative)} is negative or NaN"
    return None


def _not_a_policy(value: str) -> str | None:
    policies = ("random", "round_robin", "least_lag", "weighted")
    return None if value in policies else f"it must be one of {', '.join(repr(name) for name in policies)}"


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


def _count_between(default: int, low: int, high: int, expected: str) -> Setting:
    """A count key: an int from *low* to *high*."""
    return Setting(
        default=default,
        expected=expected,
        has_type=_is_count,
        problem=lambda value: None if low <= value <= high else f"it must be between {low} and {high}",
        example=str(default),
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
    "PRIMARY_METHODS": Setting(
        default=("POST", "PUT", "PATCH", "DELETE"),
        expected="a list of HTTP method names (str)",
        has_type=_is_method_set,
        problem=_not_method_names,
        example='["POST", "PUT", "PATCH", "DELETE"]',
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
    "REPLICA_POLICY": Setting(
        default="random",
        expected='one of "random", "round_robin", "least_lag", "weighted" (str)',
        has_type=lambda value: isinstance(value, str),
        problem=_not_a_policy,
        example='"least_lag"',
    ),
    "REPLICA_WEIGHTS": Setting(
        default={},
        expected="a dict of replica alias to weight (int or float)",
        has_type=_is_weights,
        problem=_bad_weights,
        example='{"replica1": 2, "replica2": 1}',
    ),
    "SHARED_HEALTH": Setting(
        default=True,
        expected="True or False",
        has_type=_is_bool,
        example="False",
    ),
    "SHARED_HEALTH_DIR": Setting(
        default="",
        expected="a directory path (str); empty for one under the system's temporary directory",
        has_type=lambda value: isinstance(value, str),
        example='"/run/django-scale"',
    ),
    "CACHE_ALIAS": Setting(
        default="default",
        expected="a cache alias (str)",
        has_type=_is_alias,
        problem=_empty_alias,
        example='"default"',
    ),
    "QUERY_CACHE": Setting(
        default=False,
        expected="True or False",
        has_type=_is_bool,
        example="True",
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
    "POOLER": Setting(
        default={},
        expected='a dict of database alias to "transaction" or "session"',
        has_type=_is_pooler_map,
        problem=_not_pool_modes,
        example='{"default": "transaction", "replica": "transaction"}',
    ),
    "SWR_FRESH": _seconds(60.0),
    "SWR_STALE": _seconds(3600.0),
    "METRICS_DIR": Setting(
        default="",
        expected="a directory path (str)",
        has_type=lambda value: isinstance(value, str),
        example='"/run/django-scale"',
    ),
    "METRICS_SLOTS": _count_between(32, 1, 4096, "a number of worker slots (int)"),
    "METRICS_SERIES": _count_between(1024, 1, 65536, "a number of timing series (int)"),
    "METRICS_MEMORY": _count_between(16, 1, 1024, "megabytes of buckets per worker slot (int)"),
    "METRICS_BATCH": _count_between(32, 1, 1024, "a number of requests per write (int)"),
    "METRICS_TOKEN": Setting(
        default="",
        expected="a secret token (str)",
        has_type=lambda value: isinstance(value, str),
        problem=lambda value: (
            "it must be empty (no token) or at least 32 characters long" if 0 < len(value) < 32 else None
        ),
        example='"<a random string of 32+ characters>"',
    ),
    "SLOW_QUERY_MS": Setting(
        default=100.0,
        expected="a number of milliseconds (int or float)",
        has_type=_is_number,
        problem=_negative,
        example="250",
    ),
    "SLOW_QUERY_DATABASES": Setting(
        default=(),
        expected="a list of database aliases (empty: every alias)",
        has_type=_is_alias_list,
        problem=_duplicate_aliases,
        example='["default", "replica1"]',
    ),
    "SLOW_QUERY_TOP": Setting(
        default=200,
        expected="a number of statements (int)",
        has_type=_is_count,
        problem=_not_a_positive_count,
        example="200",
    ),
    "SLOW_QUERY_REDACT": Setting(
        default=False,
        expected="True or False",
        has_type=_is_bool,
        example="True",
    ),
}
