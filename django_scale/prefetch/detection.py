"""N+1 detection: relations loaded row by row, eager loads no row used, and where they happen."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import random
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import django
from django.db.models import Model

from django_scale.conf import conf
from django_scale.exceptions import ArgumentError, NPlusOneError, NPlusOneWarning, UnusedEagerLoadWarning
from django_scale.metrics import counters
from django_scale.prefetch.peers import PeerGroup

if TYPE_CHECKING:
    from django.db.models import QuerySet

__all__ = [
    "MODES",
    "Detector",
    "Mode",
    "current_detector",
    "detect_n_plus_one",
    "note_single",
    "repeated_by_peer",
    "track_eager",
    "warn_at_caller",
    "watch",
]

logger = logging.getLogger("django_scale.prefetch")

Mode = Literal["off", "log", "warn", "raise"]
MODES: tuple[Mode, ...] = ("off", "log", "warn", "raise")


@dataclass
class Detector:
    """One scope of N+1 detection: how to report, and the result sets loaded inside it."""

    #: "raise" (tests), "warn", "log" or "off".
    mode: Mode
    #: The share of findings logged in "log" mode (sampling for production).
    sample_rate: float = 1.0
    #: Whether eager loads no row used are reported when the scope ends.
    unused_eager: bool = True
    #: The result sets with eager loads to check when the scope ends.
    groups: list[PeerGroup] = field(default_factory=list)
    #: What was reported (messages), for tests and tooling.
    findings: list[str] = field(default_factory=list)


_detector: contextvars.ContextVar[Detector | None] = contextvars.ContextVar(
    "django_scale_detector", default=None
)


def current_detector() -> Detector | None:
    """Return the detection scope in effect: the innermost :func:`detect_n_plus_one`, else the setting."""
    detector = _detector.get()
    if detector is not None:
        return detector if detector.mode != "off" else None
    mode = conf.N_PLUS_ONE
    if mode == "off":
        return None
    return Detector(mode=mode, sample_rate=conf.N_PLUS_ONE_SAMPLE_RATE, unused_eager=False)


@contextmanager
def detect_n_plus_one(
    mode: Mode = "raise", *, sample_rate: float = 1.0, unused_eager: bool = True
) -> Iterator[Detector]:
    """Detect N+1 queries and unused eager loads in the block; report them by *mode*.

    *mode* is ``"raise"`` (:exc:`~django_scale.exceptions.NPlusOneError`), ``"warn"``
    (:class:`~django_scale.exceptions.NPlusOneWarning`), ``"log"`` (logger
    ``django_scale.prefetch``, a *sample_rate* share of findings) or ``"off"``. An N+1 is a
    relation loaded row by row for a second row of one result set; a single object never
    is one. With *unused_eager*, eager loads (``select_related``, ``prefetch_related``
    without ``to_attr``) of result sets loaded in the block that no row read are reported
    when the block ends.
    """
    if mode not in MODES:
        raise ArgumentError(f"detect_n_plus_one(mode={mode!r}): mode must be one of {', '.join(MODES)}.")
    if not 0 <= sample_rate <= 1:
        raise ArgumentError(f"detect_n_plus_one(sample_rate={sample_rate!r}): it must be between 0 and 1.")
    detector = Detector(mode=mode, sample_rate=sample_rate, unused_eager=unused_eager)
    token = _detector.set(detector)
    try:
        yield detector
    finally:
        _detector.reset(token)
    if unused_eager and mode != "off":
        for group in detector.groups:
            for name in sorted(set(group.eager) - group.used):
                kind = group.eager[name]
                model = type(group.members[0]).__name__ if group.members else "?"
                _report(
                    detector,
                    f"Unused eager load: {kind}({name!r}) on {model} rows ({len(group.members)} loaded), "
                    f"and no row read {model}.{name}. Remove it from the queryset.",
                    UnusedEagerLoadWarning,
                )


def track_eager(queryset: QuerySet[Any]) -> dict[str, str] | None:
    """Return the eager loads of *queryset* to check for use, if a detection scope wants them."""
    detector = _detector.get()
    if detector is None or detector.mode == "off" or not detector.unused_eager:
        return None
    eager: dict[str, str] = {}
    select_related = queryset.query.select_related
    if isinstance(select_related, dict):
        eager.update(dict.fromkeys(select_related, "select_related"))
    for lookup in queryset._prefetch_related_lookups:  # type: ignore[attr-defined]
        if getattr(lookup, "to_attr", None):
            continue  # a plain attribute: its reads cannot be seen
        through = getattr(lookup, "prefetch_through", lookup)
        eager.setdefault(str(through).split("__")[0], "prefetch_related")
    return eager or None


def watch(group: PeerGroup) -> None:
    """Register *group* with the current detection scope, to report its unused eager loads."""
    detector = _detector.get()
    if detector is not None:
        detector.groups.append(group)


def repeated_by_peer(group: PeerGroup | None, label: str, instance: Model) -> bool:
    """Whether *instance* is the second row of *group* to do *label* on its own (once per label).

    A single object doing something row by row is never a pattern: the second peer of one
    result set doing it is.
    """
    if group is None or len(group.members) < 2 or label in group.reported:
        return False
    first = group.singles.setdefault(label, id(instance))
    if first == id(instance):
        return False
    group.reported.add(label)
    return True


def note_single(group: PeerGroup | None, label: str, instance: Model) -> None:
    """Record that *instance* loaded *label* on its own; report an N+1 at the second peer doing so."""
    detector = current_detector()
    if detector is None or not repeated_by_peer(group, label, instance):
        return
    assert group is not None
    _report(
        detector,
        f"N+1 query: {label} was loaded row by row for the rows of one result set "
        f"({len(group.members)} rows). Let the whole set load it at once: "
        "use a prefetch-aware queryset for the related model, or prefetch_related() with a "
        "Prefetch() queryset instead of filtering or slicing per row.",
        NPlusOneWarning,
    )


def _report(detector: Detector, message: str, category: type[Warning]) -> None:
    detector.findings.append(message)
    counters.increment("n_plus_one.reported")
    if detector.mode == "raise":
        raise NPlusOneError(message)
    if detector.mode == "warn":
        warn_at_caller(message, category)
    elif detector.mode == "log" and (detector.sample_rate >= 1 or random.random() < detector.sample_rate):
        # The record carries the stack (logging's own stack_info), so the line is found there.
        logger.warning(message, stack_info=True)


# -- Where the caller is ---------------------------------------------------------------------
#
# A warning names the user's line: the innermost caller outside Django, django-scale and the
# standard library's decorator plumbing. The warnings machinery finds it itself
# (``skip_file_prefixes``, Python 3.12+); django-scale never reads the stack. On Python 3.10
# and 3.11, which have no ``skip_file_prefixes``, the warning points at the library's caller
# one level up, which may be inside Django. An error (``"raise"`` mode) carries its traceback,
# and a log record its stack (``stack_info``), so the line is there in every mode.

_DJANGO_DIR = os.path.dirname(django.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep
#: The files a warning never points at: Django, django-scale, and the decorator plumbing
#: (``contextmanager``, ``wraps``) between a ``with`` block or decorated function and them.
_LIBRARY_PREFIXES = (_DJANGO_DIR, _OWN_DIR, contextlib.__file__, functools.__file__)
#: Python 3.12+ attributes warnings past the library by itself (``skip_file_prefixes``).
_HAS_SKIP_FILE_PREFIXES: bool = sys.version_info >= (3, 12)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """Issue a warning attributed to the innermost caller outside Django and django-scale."""
    if _HAS_SKIP_FILE_PREFIXES:
        warnings.warn(message, category, skip_file_prefixes=_LIBRARY_PREFIXES)  # type: ignore[call-overload,unused-ignore]
    else:
        warnings.warn(message, category, stacklevel=3)
