"""The one ``DJANGO_SCALE`` setting, read lazily through :data:`conf`.

Every property reads ``settings.DJANGO_SCALE`` at the time it is accessed, never at import,
so :func:`django.test.override_settings` and
:func:`django_scale.testing.override_scale_settings` take effect at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings

from django_scale.exceptions import ConfigurationError

__all__ = ["SETTINGS", "Setting", "conf"]


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


def _empty_alias(value: str) -> str | None:
    return "it is empty" if not value else None


def _duplicate_aliases(value: Sequence[str]) -> str | None:
    duplicates = sorted({alias for alias in value if list(value).count(alias) > 1})
    if duplicates:
        return f"it lists {', '.join(repr(alias) for alias in duplicates)} more than once"
    if "" in value:
        return "it contains an empty alias"
    return None


def _not_positive(value: float) -> str | None:
    return "it must be greater than zero" if value <= 0 else None


#: Every key of ``DJANGO_SCALE`` with its default. ``docs/settings.md`` documents each one.
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
    "MAX_REPLICA_LAG": Setting(
        default=5.0,
        expected="a number of seconds (int or float)",
        has_type=_is_number,
        problem=_not_positive,
        example="5.0",
    ),
    "CACHE_ALIAS": Setting(
        default="default",
        expected="a cache alias (str)",
        has_type=_is_alias,
        problem=_empty_alias,
        example='"default"',
    ),
}


class Conf:
    """Typed, lazy access to ``settings.DJANGO_SCALE`` with documented defaults."""

    def user_settings(self) -> Mapping[str, Any]:
        """Return the ``DJANGO_SCALE`` dict as the project set it (empty when unset)."""
        value = getattr(settings, "DJANGO_SCALE", None)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                f"The DJANGO_SCALE setting must be a dict, not {type(value).__name__}. "
                'Set it to a dict, for example DJANGO_SCALE = {"REPLICAS": ["replica"]}.'
            )
        return value

    def get(self, name: str) -> Any:
        """Return the value of key *name*: the project's, or the documented default."""
        if name not in SETTINGS:
            raise KeyError(f"{name!r} is not a DJANGO_SCALE key")
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
    def CACHE_ALIAS(self) -> str:
        """The cache that holds django-scale's shared state. Default: ``"default"``."""
        return cast(str, self.get("CACHE_ALIAS"))


#: The one instance to read settings through: ``from django_scale.conf import conf``.
conf = Conf()
