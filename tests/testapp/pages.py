"""Pages cached with ``swr_cache_page``, for the isolation suite (tests/test_isolation_pages.py).

Each page shows what one per-visitor channel carries (the CSRF token, flash messages, session
data, the user, the ``Authorization`` header, the language, a header a middleware varies on)
and comes as a sync and an async view, under ``/iso/sync/...`` and ``/iso/async/...``. They
live at module level so the Celery worker finds them by their dotted path. The views that set
up a visitor's state (add a message, store session data) are not cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.urls import path
from django.utils import translation

from django_scale.cache import swr_cache_page

from testapp.cached import probe


def _render(request: HttpRequest, source: str, **context: Any) -> HttpResponse:
    template = engines["django"].from_string(source)
    return HttpResponse(template.render({"data": probe.data, **context}, request))


def _form(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return HttpResponse("posted")
    probe.record("form", None)
    return _render(request, "<form method='post'>{% csrf_token %}<button>go</button></form> {{ data }}")


def _messages(request: HttpRequest) -> HttpResponse:
    probe.record("messages", None)
    return _render(request, "<ul>{% for m in messages %}<li>{{ m }}</li>{% endfor %}</ul> news {{ data }}")


def _session(request: HttpRequest) -> HttpResponse:
    probe.record("session", None)
    return HttpResponse(f"nick={request.session.get('nick')} {probe.data}")


def _per_user(request: HttpRequest) -> HttpResponse:
    probe.record("per_user", None)
    name = request.user.get_username() or "anonymous"
    return HttpResponse(f"hello {name} nick={request.session.get('nick')} {probe.data}")


def _authorization(request: HttpRequest) -> HttpResponse:
    # An API view authenticating by token: it reads the header, never the session.
    probe.record("authorization", None)
    return HttpResponse(f"hello {request.headers.get('Authorization', 'nobody')} {probe.data}")


def _language(request: HttpRequest) -> HttpResponse:
    probe.record("language", translation.get_language())
    return HttpResponse(f"lang={translation.get_language()} {probe.data}")


def _tenant(request: HttpRequest) -> HttpResponse:
    # TenantMiddleware (outside the view) picks the tenant from X-Tenant and varies on it.
    probe.record("tenant", None)
    return HttpResponse(f"tenant={getattr(request, 'tenant', None)} {probe.data}")


def _shared_form(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return HttpResponse("posted")
    probe.record("shared_form", None)
    return _render(request, "<form method='post'>{% csrf_token %}</form> {{ data }}")


def _plain(request: HttpRequest) -> HttpResponse:
    probe.record("plain", None)
    return HttpResponse(f"plain {probe.data}")


# One sync and one async view per channel, at module level for the Celery worker. The async
# ones run the body in a thread: the session and messages are read from the database.


@swr_cache_page(60, 3600)
def form(request: HttpRequest) -> HttpResponse:
    return _form(request)


@swr_cache_page(60, 3600)
async def async_form(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_form)(request)


@swr_cache_page(60, 3600)
def messages_page(request: HttpRequest) -> HttpResponse:
    return _messages(request)


@swr_cache_page(60, 3600)
async def async_messages_page(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_messages)(request)


@swr_cache_page(60, 3600)
def session_page(request: HttpRequest) -> HttpResponse:
    return _session(request)


@swr_cache_page(60, 3600)
async def async_session_page(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_session)(request)


@swr_cache_page(60, 3600, vary_on=["user"])
def per_user(request: HttpRequest) -> HttpResponse:
    return _per_user(request)


@swr_cache_page(60, 3600, vary_on=["user"])
async def async_per_user(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_per_user)(request)


@swr_cache_page(60, 3600)
def authorization(request: HttpRequest) -> HttpResponse:
    return _authorization(request)


@swr_cache_page(60, 3600)
async def async_authorization(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_authorization)(request)


@swr_cache_page(60, 3600, vary_on=["Authorization"])
def by_token(request: HttpRequest) -> HttpResponse:
    return _authorization(request)


@swr_cache_page(60, 3600, vary_on=["Authorization"])
async def async_by_token(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_authorization)(request)


@swr_cache_page(60, 3600)
def language(request: HttpRequest) -> HttpResponse:
    return _language(request)


@swr_cache_page(60, 3600)
async def async_language(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_language)(request)


@swr_cache_page(60, 3600, vary_on=["Accept-Language"])
def language_header(request: HttpRequest) -> HttpResponse:
    return _language(request)


@swr_cache_page(60, 3600, vary_on=["Accept-Language"])
async def async_language_header(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_language)(request)


@swr_cache_page(60, 3600)
def tenant(request: HttpRequest) -> HttpResponse:
    return _tenant(request)


@swr_cache_page(60, 3600)
async def async_tenant(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_tenant)(request)


@swr_cache_page(60, 3600, vary_on=["X-Tenant"])
def by_tenant(request: HttpRequest) -> HttpResponse:
    return _tenant(request)


@swr_cache_page(60, 3600, vary_on=["X-Tenant"])
async def async_by_tenant(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_tenant)(request)


@swr_cache_page(60, 3600, shared=True)
def shared_form(request: HttpRequest) -> HttpResponse:
    return _shared_form(request)


@swr_cache_page(60, 3600, shared=True)
async def async_shared_form(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_shared_form)(request)


@swr_cache_page(60, 3600)
def plain(request: HttpRequest) -> HttpResponse:
    return _plain(request)


@swr_cache_page(60, 3600)
async def async_plain(request: HttpRequest) -> HttpResponse:
    return await sync_to_async(_plain)(request)


@swr_cache_page(60, 3600, wait=0)
def impatient_form(request: HttpRequest) -> HttpResponse:
    """A form whose cold-miss callers never wait for the claim holder: they render themselves."""
    return _form(request)


# -- set-up views (not cached) -------------------------------------------------------------------


def add_message(request: HttpRequest) -> HttpResponse:
    messages.info(request, request.GET["text"])
    return HttpResponse("added")


def set_nick(request: HttpRequest) -> HttpResponse:
    request.session["nick"] = request.GET["nick"]
    return HttpResponse("set")


PAGES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "form": (form, async_form),
    "messages": (messages_page, async_messages_page),
    "session": (session_page, async_session_page),
    "per-user": (per_user, async_per_user),
    "authorization": (authorization, async_authorization),
    "by-token": (by_token, async_by_token),
    "language": (language, async_language),
    "language-header": (language_header, async_language_header),
    "tenant": (tenant, async_tenant),
    "by-tenant": (by_tenant, async_by_tenant),
    "shared-form": (shared_form, async_shared_form),
    "plain": (plain, async_plain),
}

urlpatterns = [
    path("add-message/", add_message),
    path("sync/impatient-form/", impatient_form),
    path("set-nick/", set_nick),
    *(path(f"sync/{name}/", views[0]) for name, views in PAGES.items()),
    *(path(f"async/{name}/", views[1]) for name, views in PAGES.items()),
]
