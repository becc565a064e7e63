"""``django_scale.W111``: ScaleMiddleware built for ASGI warns about persistent connections.

Under ASGI Django runs each request's sync code in a thread of its own, so a connection kept
between requests (``CONN_MAX_AGE`` not 0) is left open by every request (Django ticket
#33497). No system check can know the server: the middleware checks when Django builds it for
async requests, and logs the warning once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.test import override_settings

from django_scale import middleware
from django_scale.conf import conf
from django_scale.middleware import ScaleMiddleware


async def _async_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse("")


def _sync_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse("")


@pytest.fixture
def primary_settings() -> Iterator[dict[str, Any]]:
    """The primary's live settings, put back afterwards; the process's warnings forgotten."""
    settings_dict = connections[conf.PRIMARY].settings_dict
    saved = {key: settings_dict.get(key) for key in ("CONN_MAX_AGE", "OPTIONS")}
    saved["OPTIONS"] = dict(saved["OPTIONS"] or {})
    middleware._warned.clear()
    try:
        yield settings_dict
    finally:
        settings_dict.update(saved)
        middleware._warned.clear()


def _w111(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "django_scale.W111" in record.getMessage()]


def test_persistent_connections_under_asgi_are_warned_about_once(
    primary_settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    primary_settings["CONN_MAX_AGE"] = 60
    with caplog.at_level(logging.WARNING, logger="django_scale.middleware"):
        ScaleMiddleware(_async_view)
        ScaleMiddleware(_async_view)
    [message] = _w111(caplog)
    assert f"aliases {conf.PRIMARY!r} keep connections" in message
    assert (
        "#33497" in message and "CONN_MAX_AGE to 0" in message and "checks.html#django-scale-w111" in message
    )


def test_a_wsgi_process_or_connections_closed_per_request_are_not_warned_about(
    primary_settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    primary_settings["CONN_MAX_AGE"] = 60
    with caplog.at_level(logging.WARNING, logger="django_scale.middleware"):
        ScaleMiddleware(_sync_view)  # WSGI: one thread per request's whole life
    assert _w111(caplog) == []
    primary_settings["CONN_MAX_AGE"] = 0
    with caplog.at_level(logging.WARNING, logger="django_scale.middleware"):
        ScaleMiddleware(_async_view)
    assert _w111(caplog) == []


def test_a_connection_pool_or_silencing_the_id_is_not_warned_about(
    primary_settings: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    primary_settings["CONN_MAX_AGE"] = None
    primary_settings["OPTIONS"] = {**primary_settings["OPTIONS"], "pool": True}
    with caplog.at_level(logging.WARNING, logger="django_scale.middleware"):
        ScaleMiddleware(_async_view)
    assert _w111(caplog) == []
    primary_settings["OPTIONS"] = {
        key: value for key, value in primary_settings["OPTIONS"].items() if key != "pool"
    }
    with (
        override_settings(SILENCED_SYSTEM_CHECKS=["django_scale.W111"]),
        caplog.at_level(logging.WARNING, logger="django_scale.middleware"),
    ):
        ScaleMiddleware(_async_view)
    assert _w111(caplog) == []
    # Unsilenced, the same settings are warned about.
    with caplog.at_level(logging.WARNING, logger="django_scale.middleware"):
        ScaleMiddleware(_async_view)
    assert len(_w111(caplog)) == 1
