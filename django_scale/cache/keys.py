"""Cache keys: the one encoding of arguments and vary values, and the key of an entry.

Every key is :func:`build_key` of a path, a version and the text :func:`encode_key_parts`
makes of the parts (JSON, dict keys sorted, every type JSON lacks tagged with its type). One
set of tags serves both kinds of parts:

* a cached function's arguments go straight to :func:`encode_key_parts`: they must equal the
  key a Celery refill rebuilds from their JSON, so JSON's own types (and their subclasses)
  encode as JSON does;
* a fragment's vary values go through :func:`key_value` first, which is stricter: a
  ``str``/``int``/``float`` subclass (a model choice) is tagged with its class, a lazy
  translation is its text, ``AnonymousUser`` is one value, and a dict, a queryset or any
  other object has no stable key (fragments are never refilled from JSON).
"""

from __future__ import annotations

import datetime
import decimal
import functools
import hashlib
import json
import uuid
from typing import Any

from django.apps import apps
from django.db import models
from django.http import HttpRequest
from django.utils.functional import Promise

from django_scale.exceptions import CacheKeyError

__all__ = ["UnstableValue", "build_key", "encode_key_parts", "json_roundtrips", "key_value"]


class UnstableValue(CacheKeyError):
    """A value with no stable key; :attr:`what` says what it is, in words."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        #: The value, in words ("an unsaved Author (it has no primary key)").
        self.what = what


def _unstable(value: Any) -> UnstableValue:
    """Return the error for *value*, which has no stable key."""
    name = value.__class__.__name__  # through a lazy object (request.user) too
    if isinstance(value, models.Model):
        return UnstableValue(
            f"Cannot build a cache key from an unsaved {name}: it has no primary key. Save it "
            "first or pass the values the function needs.",
            f"an unsaved {name} (it has no primary key)",
        )
    if isinstance(value, HttpRequest):
        return UnstableValue(
            "Cannot build a cache key from an HttpRequest: it would either share one entry "
            "between users or never hit. Pass what the function needs from it (request.user.pk, "
            "a query parameter) as arguments, or cache the view with swr_cache_page(vary_on=...).",
            "an HttpRequest (it has no stable key)",
        )
    if isinstance(value, models.QuerySet):
        what = (
            f"a {name} of {value.model._meta.label} (pass what it varies on instead: the values it "
            "is filtered by, or a list of primary keys)"
        )
        return UnstableValue(f"Cannot build a cache key from {what}.", what)
    return UnstableValue(
        f"Cannot build a cache key from an argument of type {name}: pass str, int, float, bool, "
        "None, lists, dicts, dates, Decimals, UUIDs or saved model instances, or give "
        "stale_while_revalidate a key= function that returns a str.",
        f"a {name} (it has no stable key)",
    )


def _encode_argument(value: Any) -> Any:
    """Turn a value JSON cannot encode into an unambiguous JSON value, or raise :class:`UnstableValue`."""
    if isinstance(value, models.Model):
        if value.pk is None:
            raise _unstable(value)
        return {"\x00model": value._meta.label_lower, "pk": value.pk}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return {"\x00" + type(value).__name__: value.isoformat()}
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return {"\x00" + type(value).__name__: str(value)}
    if isinstance(value, (set, frozenset)):
        return {
            "\x00set": sorted(json.dumps(item, default=_encode_argument, sort_keys=True) for item in value)
        }
    if isinstance(value, bytes):
        return {"\x00bytes": value.hex()}
    raise _unstable(value)


@functools.cache
def _anonymous_user_class() -> type | None:
    # django.contrib.auth.models can only be imported when the app is installed.
    if not apps.is_installed("django.contrib.auth"):
        return None
    from django.contrib.auth.models import AnonymousUser

    return AnonymousUser


def key_value(value: Any) -> Any:
    """Return the key part of the fragment vary value *value*, or raise :class:`UnstableValue`.

    Stable: ``None``, ``str``, ``int``, ``float``, ``bool`` (and subclasses such as model
    choices, tagged with their class), ``Decimal``, ``date``, ``datetime``, ``time``,
    ``UUID``, lazy translations, saved model instances (by their own model's
    ``app_label.model_name`` and primary key: a proxy and its concrete model, or a child and
    its parent, are different keys), ``AnonymousUser`` (one key for every anonymous
    visitor), and lists and tuples of these. Anything else has no stable key: a queryset, a
    dict, an unsaved instance, an arbitrary object.
    """
    kind = type(value)
    if value is None or kind is str or kind is int or kind is float or kind is bool:
        return value
    if kind is list or kind is tuple:
        return [key_value(item) for item in value]
    anonymous = _anonymous_user_class()
    if anonymous is not None and isinstance(value, anonymous):
        return {"\x00anonymous_user": True}
    if isinstance(value, models.Model):
        # isinstance and attribute access also see through a lazy object (request.user).
        if value.pk is None:
            raise _unstable(value)
        return {"\x00model": value._meta.label_lower, "pk": key_value(value.pk)}
    if isinstance(value, (decimal.Decimal, uuid.UUID, datetime.date, datetime.time)):
        return value  # encode_key_parts tags them by type
    if isinstance(value, Promise):
        return str(value)  # a lazy translation: the key has the language already
    for base in (str, int, float):
        if isinstance(value, base):
            cls = value.__class__
            return {f"\x00{cls.__module__}.{cls.__qualname__}": base(value)}
    raise _unstable(value)


def encode_key_parts(parts: object) -> str:
    """Return the stable, unambiguous text of *parts* (JSON, dict keys sorted, types tagged)."""
    return json.dumps(parts, default=_encode_argument, sort_keys=True, separators=(",", ":"))


def build_key(path: str, version: object, text: str) -> str:
    """Return the cache key of one entry: the function's path, its version and an argument digest.

    The part in braces is a Redis Cluster hash tag, so an entry and its claim, generation and
    notify keys live in one slot (the Lua scripts need that).
    """
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return f"swr:{{{path}:{version}:{digest}}}"


# -- Stores: the cache operations, on Redis (atomic, blocking waits) or any Django cache --------


def json_roundtrips(value: Any) -> bool:
    """Whether *value* survives JSON unchanged (tuples, sets, dates and models do not)."""
    try:
        return bool(json.loads(json.dumps(value)) == value)
    except (TypeError, ValueError):
        return False
