"""System checks, with ids ``django_scale.E<NNN>`` / ``django_scale.W<NNN>``.

Ids are numbered in ranges: 0xx settings, 1xx routing, 2xx cache and Celery, 3xx admin,
4xx querysets, 5xx operations. An id is never reused; each has an anchor in ``docs/checks.md``.
One factory per message keeps every id in exactly one place.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core import checks

from django_scale.conf import SETTINGS, conf

__all__ = ["check_settings", "register_checks"]

DOCS = "https://django-scale.readthedocs.io/en/latest/checks.html"


def _message(
    level: type[checks.Error | checks.Warning], check_id: str, msg: str, fix: str
) -> checks.CheckMessage:
    """Build a check message whose hint gives the fix and links to the id's docs."""
    # docs/checks.md labels each id as (django-scale-e001)=, which Sphinx renders as this id.
    anchor = check_id.lower().replace("_", "-").replace(".", "-")
    return level(msg, hint=f"{fix} See {DOCS}#{anchor}", id=check_id)


def _e001_not_a_dict(value: Any) -> checks.CheckMessage:
    return _message(
        checks.Error,
        "django_scale.E001",
        f"The DJANGO_SCALE setting must be a dict, not {type(value).__name__}.",
        'Set it to a dict, e.g. DJANGO_SCALE = {"REPLICAS": ["replica"]}.',
    )


def _w001_unknown_key(key: str) -> checks.CheckMessage:
    matches = difflib.get_close_matches(str(key).upper(), SETTINGS, n=1, cutoff=0.6)
    fix = f"Did you mean {matches[0]!r}?" if matches else f"Known keys: {', '.join(sorted(SETTINGS))}."
    return _message(
        checks.Warning,
        "django_scale.W001",
        f"DJANGO_SCALE[{key!r}] is not a django-scale setting and is ignored.",
        fix,
    )


def _e002_wrong_type(key: str, value: Any) -> checks.CheckMessage:
    spec = SETTINGS[key]
    return _message(
        checks.Error,
        "django_scale.E002",
        f"DJANGO_SCALE[{key!r}] must be {spec.expected}, not {type(value).__name__} ({value!r}).",
        f"Set it to e.g. DJANGO_SCALE[{key!r}] = {spec.example}.",
    )


def _e003_invalid_value(key: str, value: Any, problem: str) -> checks.CheckMessage:
    spec = SETTINGS[key]
    return _message(
        checks.Error,
        "django_scale.E003",
        f"DJANGO_SCALE[{key!r}] = {value!r} is not allowed: {problem}.",
        f"Set it to e.g. DJANGO_SCALE[{key!r}] = {spec.example}.",
    )


def _e004_unknown_database(key: str, alias: str) -> checks.CheckMessage:
    known = ", ".join(repr(name) for name in settings.DATABASES) or "none"
    return _message(
        checks.Error,
        "django_scale.E004",
        f"DJANGO_SCALE[{key!r}] names the database alias {alias!r}, which is not in DATABASES.",
        f"Add {alias!r} to DATABASES or remove it from DJANGO_SCALE[{key!r}] (DATABASES has {known}).",
    )


def _e005_unknown_cache(alias: str) -> checks.CheckMessage:
    known = ", ".join(repr(name) for name in getattr(settings, "CACHES", {})) or "none"
    return _message(
        checks.Error,
        "django_scale.E005",
        f"DJANGO_SCALE['CACHE_ALIAS'] names the cache alias {alias!r}, which is not in CACHES.",
        f"Add {alias!r} to CACHES or set DJANGO_SCALE['CACHE_ALIAS'] to one of {known}.",
    )


def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """Check the ``DJANGO_SCALE`` setting: its keys, their types and the aliases they name."""
    user = getattr(settings, "DJANGO_SCALE", None)
    if user is None:
        user = {}
    if not isinstance(user, dict):
        return [_e001_not_a_dict(user)]

    messages: list[checks.CheckMessage] = [_w001_unknown_key(key) for key in user if key not in SETTINGS]
    valid: set[str] = set()
    for key, spec in SETTINGS.items():
        if key not in user:
            valid.add(key)
            continue
        value = user[key]
        if not spec.has_type(value):
            messages.append(_e002_wrong_type(key, value))
        elif (problem := spec.problem(value)) is not None:
            messages.append(_e003_invalid_value(key, value, problem))
        else:
            valid.add(key)

    # Alias checks only make sense once the value itself is well-formed.
    aliases: Iterable[tuple[str, str]] = [
        *([("PRIMARY", conf.PRIMARY)] if "PRIMARY" in valid else []),
        *(("REPLICAS", alias) for alias in (conf.REPLICAS if "REPLICAS" in valid else ())),
    ]
    messages.extend(
        _e004_unknown_database(key, alias) for key, alias in aliases if alias not in settings.DATABASES
    )
    if "CACHE_ALIAS" in valid and conf.CACHE_ALIAS not in getattr(settings, "CACHES", {}):
        messages.append(_e005_unknown_cache(conf.CACHE_ALIAS))
    return messages


def register_checks() -> None:
    """Register django-scale's system checks with Django (called from ``AppConfig.ready()``)."""
    checks.register(check_settings, "django_scale")
