"""Isolation of ``swr_cache_page``: a visitor never receives anything of another visitor's.

Written from the attacker's side: for each per-visitor channel (the CSRF token, flash messages
in cookie and session storage, session data, the user, the ``Authorization`` header, the
language by header and by cookie, a ``Vary`` a middleware adds outside the view) two or more
visitors (test clients with their own cookies) ask for one cached page, sync and async, and
the later ones must never see the first one's data. They run on the suite's default cache:
Redis on the services backend, the local-memory cache on SQLite.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.cache import caches
from django.http import HttpResponse
from django.test import AsyncClient, Client, RequestFactory
from django.test.utils import override_settings
from django.utils import translation
from support import counter, wait_until

from django_scale import metrics
from django_scale.cache import reset_state, wait_for_refills
from django_scale.cache.degrade import breakers
from django_scale.cache.store import MARKER, Envelope, store_for

from testapp import pages
from testapp.cached import probe

FLAVORS = ["sync", "async"]
SCALE = "django_scale.middleware.ScaleMiddleware"
SECRET = "first-visitors-secret"


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    probe.reset()
    metrics.reset()
    reset_state()
    caches["default"].clear()
    yield
    assert wait_for_refills(), "the refill publisher is stuck"
    reset_state()
    caches["default"].clear()


async def _await(awaitable: Any) -> Any:
    return await awaitable


class Visitor:
    """One browser: a test client with its own cookies, sync (``Client``) or async (``AsyncClient``).

    Every response it gets is checked for the one header combination that is never allowed:
    ``Cache-Control: public`` together with ``Set-Cookie``.
    """

    def __init__(self, flavor: str, **options: Any) -> None:
        self.client: Client | AsyncClient = AsyncClient(**options) if flavor == "async" else Client(**options)

    def get(self, url: str, **headers: str) -> HttpResponse:
        return self._call("get", url, headers=headers)

    def post(self, url: str, data: dict[str, str]) -> HttpResponse:
        return self._call("post", url, data)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> HttpResponse:
        response = getattr(self.client, method)(*args, **kwargs)
        if isinstance(self.client, AsyncClient):
            response = async_to_sync(_await)(response)
        control = response.get("Cache-Control", "")
        assert not ("public" in control and response.cookies), (
            f"{args[0]} went out {control!r} with Set-Cookie {sorted(response.cookies)}"
        )
        return response


def page(flavor: str, name: str) -> str:
    return f"/iso/{flavor}/{name}/"


def text(response: HttpResponse) -> str:
    assert response.status_code == 200, response
    return response.content.decode()


def middleware(*extra: str, after: str = SCALE) -> list[str]:
    """The suite's MIDDLEWARE with *extra* inserted after the entry *after*."""
    entries = list(settings.MIDDLEWARE)
    position = entries.index(after) + 1
    return [*entries[:position], *extra, *entries[position:]]


# -- the CSRF token ------------------------------------------------------------------------------------


def csrf_token(response: HttpResponse) -> str:
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', text(response))
    assert found, response.content
    return found.group(1)


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_page_with_a_csrf_token_never_serves_one_visitors_token_to_another(flavor: str) -> None:
    url = page(flavor, "form")
    first, second = Visitor(flavor, enforce_csrf_checks=True), Visitor(flavor, enforce_csrf_checks=True)
    first_token = csrf_token(first.get(url))
    second_token = csrf_token(second.get(url))
    # A token is masked anew at every render: the same token means the first visitor's page.
    assert second_token != first_token
    assert "csrftoken" in second.client.cookies
    # Each visitor's form posts with their own cookie and the token of their own page.
    assert text(second.post(url, {"csrfmiddlewaretoken": second_token})) == "posted"
    assert text(first.post(url, {"csrfmiddlewaretoken": first_token})) == "posted"
    assert probe.count("form") == 2


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_shared_page_never_stores_a_csrf_token_kept_in_the_session(flavor: str) -> None:
    """With CSRF_USE_SESSIONS the second render sets no cookie: the token's use must still count.

    This pins Django's ``CSRF_COOKIE_NEEDS_UPDATE`` request flag (django/middleware/csrf.py,
    ``get_token``), which the final test reads because nothing public says the token was used.
    """
    url = page(flavor, "shared-form")
    with override_settings(CSRF_USE_SESSIONS=True):
        first = Visitor(flavor, enforce_csrf_checks=True)
        first.get("/iso/set-nick/?nick=someone")
        csrf_token(first.get(url))  # puts the token in the first visitor's session
        first_token = csrf_token(first.get(url))  # reads it back: no cookie, no session write
        second = Visitor(flavor, enforce_csrf_checks=True)
        second_token = csrf_token(second.get(url))
        assert second_token != first_token
        assert text(second.post(url, {"csrfmiddlewaretoken": second_token})) == "posted"
        assert text(first.post(url, {"csrfmiddlewaretoken": first_token})) == "posted"


# -- flash messages ------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize(
    "storage", ["cookie.CookieStorage", "session.SessionStorage", "fallback.FallbackStorage"]
)
def test_flash_messages_never_reach_another_visitor(flavor: str, storage: str) -> None:
    url = page(flavor, "messages")
    with override_settings(MESSAGE_STORAGE=f"django.contrib.messages.storage.{storage}"):
        first = Visitor(flavor)
        first.get(f"/iso/add-message/?text={SECRET}")
        assert SECRET in text(first.get(url))
        for _ in range(2):
            assert SECRET not in text(Visitor(flavor).get(url))
        if storage.startswith("fallback"):
            # The default storage reads no session and sets no cookie for a visitor without
            # messages: their page is stored and served (rendered for the first visitor and
            # for the second only).
            assert probe.count("messages") == 2


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_page_refused_for_every_visitor_is_rendered_live_without_claims(flavor: str) -> None:
    # A form with {% csrf_token %} can never be stored. After the first refusal the process
    # renders it live, so concurrent visitors do not queue behind each other's claims.
    url = page(flavor, "form")
    tokens = {csrf_token(Visitor(flavor).get(url)) for _ in range(3)}
    assert len(tokens) == 3
    assert probe.count("form") == 3
    assert counter("swr.miss") == 1  # only the first request claimed the key


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_page_refused_for_one_visitor_is_stored_for_the_next(flavor: str) -> None:
    # Flash messages are the visitor's own: the next visitor's rendering is stored as usual.
    url = page(flavor, "messages")
    first = Visitor(flavor)
    first.get(f"/iso/add-message/?text={SECRET}")
    assert SECRET in text(first.get(url))
    assert SECRET not in text(Visitor(flavor).get(url))
    assert SECRET not in text(Visitor(flavor).get(url))
    assert probe.count("messages") == 2  # the second visitor's page was stored and served
    assert counter("swr.miss") == 2


# -- session data and the user ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_session_data_never_reaches_another_visitor(flavor: str) -> None:
    url = page(flavor, "session")
    first = Visitor(flavor)
    first.get(f"/iso/set-nick/?nick={SECRET}")
    assert text(first.get(url)) == f"nick={SECRET} v1"
    assert text(Visitor(flavor).get(url)) == "nick=None v1"


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_page_per_user_keeps_anonymous_sessions_and_users_apart(
    flavor: str, django_user_model: Any
) -> None:
    url = page(flavor, "per-user")
    anonymous_with_session = Visitor(flavor)
    anonymous_with_session.get(f"/iso/set-nick/?nick={SECRET}")
    assert text(anonymous_with_session.get(url)) == f"hello anonymous nick={SECRET} v1"
    # Anonymous visitors without a session share one entry, which never holds session data.
    assert text(Visitor(flavor).get(url)) == "hello anonymous nick=None v1"
    assert text(Visitor(flavor).get(url)) == "hello anonymous nick=None v1"
    assert probe.count("per_user") == 2
    # An anonymous visitor with a session is not served that entry either.
    late = Visitor(flavor)
    late.get("/iso/set-nick/?nick=late")
    assert text(late.get(url)) == "hello anonymous nick=late v1"
    assert probe.count("per_user") == 3
    # Users get their own entries, marked private.
    alice, bob = Visitor(flavor), Visitor(flavor)
    alice.client.force_login(django_user_model.objects.create_user("alice"))
    bob.client.force_login(django_user_model.objects.create_user("bob"))
    assert text(alice.get(url)) == "hello alice nick=None v1"
    assert text(bob.get(url)) == "hello bob nick=None v1"
    again = alice.get(url)
    assert text(again) == "hello alice nick=None v1"
    assert "private" in again["Cache-Control"]
    assert probe.count("per_user") == 5


# -- the Authorization header ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_request_with_credentials_is_never_stored_nor_served_a_shared_page(flavor: str) -> None:
    url = page(flavor, "authorization")
    with_token = Visitor(flavor).get(url, Authorization=f"Bearer {SECRET}")
    assert text(with_token) == f"hello Bearer {SECRET} v1"
    assert "public" not in with_token.get("Cache-Control", "")
    assert text(Visitor(flavor).get(url)) == "hello nobody v1"
    assert text(Visitor(flavor).get(url)) == "hello nobody v1"  # stored for visitors without one
    assert text(Visitor(flavor).get(url, Authorization="Bearer second")) == "hello Bearer second v1"
    assert probe.count("authorization") == 3


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_page_that_varies_on_authorization_is_stored_per_credential(flavor: str) -> None:
    url = page(flavor, "by-token")
    assert text(Visitor(flavor).get(url, Authorization=f"Bearer {SECRET}")) == f"hello Bearer {SECRET} v1"
    assert text(Visitor(flavor).get(url, Authorization="Bearer second")) == "hello Bearer second v1"
    assert text(Visitor(flavor).get(url)) == "hello nobody v1"
    assert text(Visitor(flavor).get(url, Authorization=f"Bearer {SECRET}")) == f"hello Bearer {SECRET} v1"
    assert probe.count("authorization") == 3


def test_a_page_keyed_by_credentials_is_refilled_by_its_holder_never_through_the_broker() -> None:
    url = page("sync", "by-token")
    assert text(Visitor("sync").get(url, Authorization=f"Bearer {SECRET}")) == f"hello Bearer {SECRET} v1"
    request = RequestFactory().get(url, HTTP_AUTHORIZATION=f"Bearer {SECRET}")
    with translation.override(settings.LANGUAGE_CODE):
        key = pages.by_token._django_scale_page.key(request, (), {})
    store = store_for("default")
    envelope = store.get(key)
    assert envelope is not None
    assert store.write(
        key, envelope._replace(fresh_until=envelope.fresh_until - 3600), 3600, store.generation(key), ""
    )
    probe.data = "v2"
    assert text(Visitor("sync").get(url, Authorization=f"Bearer {SECRET}")) == f"hello Bearer {SECRET} v2"
    assert counter("swr.refill.inline") == 1
    assert counter("swr.refill.enqueued") == 0
    assert pages.by_token._django_scale_engine.rebuild is None  # a message for it is refused


# -- the language -------------------------------------------------------------------------------------------


@pytest.fixture
def locale() -> Iterator[None]:
    """LocaleMiddleware in the stack, choosing among English, French and German."""
    with override_settings(
        MIDDLEWARE=middleware("django.middleware.locale.LocaleMiddleware", after=settings.MIDDLEWARE[1]),
        LANGUAGES=[("en", "English"), ("fr", "French"), ("de", "German")],
        LANGUAGE_CODE="en",
    ):
        yield


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["language", "language-header"])
def test_the_language_chosen_by_header_is_part_of_the_key(flavor: str, name: str, locale: None) -> None:
    url = page(flavor, name)
    assert text(Visitor(flavor).get(url, Accept_Language="fr")) == "lang=fr v1"
    assert text(Visitor(flavor).get(url, Accept_Language="de")) == "lang=de v1"
    french = Visitor(flavor).get(url, Accept_Language="fr")
    assert text(french) == "lang=fr v1"
    assert french["Content-Language"] == "fr"
    assert probe.count("language") == 2


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["language", "language-header"])
def test_the_language_chosen_by_cookie_is_part_of_the_key(flavor: str, name: str, locale: None) -> None:
    url = page(flavor, name)
    german_by_cookie = Visitor(flavor)
    german_by_cookie.client.cookies[settings.LANGUAGE_COOKIE_NAME] = "de"
    assert text(german_by_cookie.get(url, Accept_Language="fr")) == "lang=de v1"
    assert text(Visitor(flavor).get(url, Accept_Language="fr")) == "lang=fr v1"
    german = german_by_cookie.get(url, Accept_Language="fr")
    assert text(german) == "lang=de v1"
    # A shared cache downstream must not serve it by Accept-Language alone.
    assert "Cookie" in german["Vary"]


# -- a Vary added outside the view ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_vary_added_by_a_middleware_outside_the_view_is_honoured(flavor: str) -> None:
    with override_settings(MIDDLEWARE=middleware("testapp.middleware.TenantMiddleware")):
        url = page(flavor, "tenant")
        assert text(Visitor(flavor).get(url, X_Tenant="first")) == "tenant=first v1"
        assert text(Visitor(flavor).get(url, X_Tenant="second")) == "tenant=second v1"
        # Listed in vary_on, the header is part of the key and the page is stored per tenant.
        url = page(flavor, "by-tenant")
        for tenant in ("first", "second", "first", "second"):
            assert text(Visitor(flavor).get(url, X_Tenant=tenant)) == f"tenant={tenant} v1"
    assert probe.count("tenant") == 4


# -- the final pass: headers, inline refills, the cache down -------------------------------------------------


def test_a_page_served_from_the_cache_is_private_when_a_middleware_sets_a_cookie() -> None:
    url = page("sync", "plain")
    with override_settings(MIDDLEWARE=middleware("testapp.middleware.TrackingMiddleware")):
        stored = Visitor("sync").get(url)
        assert "public" in stored["Cache-Control"]
        tracked = Visitor("sync").get(url, X_Track="someone")
        assert text(tracked) == "plain v1"
        assert tracked.cookies["tracked"].value == "someone"
        assert "private" in tracked["Cache-Control"]
        assert "public" in Visitor("sync").get(url)["Cache-Control"]
    assert probe.count("plain") == 1


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_claim_holder_of_a_stale_page_per_user_gets_its_own_fresh_rendering(
    flavor: str, django_user_model: Any
) -> None:
    url = page(flavor, "per-user")
    user = django_user_model.objects.create_user("alice")
    alice = Visitor(flavor)
    alice.client.force_login(user)
    assert text(alice.get(url)) == "hello alice nick=None v1"
    request = RequestFactory().get(url)
    request.user = user
    view = (pages.per_user if flavor == "sync" else pages.async_per_user)._django_scale_page
    store = store_for("default")
    key = view.key(request, (), {})
    envelope = store.get(key)
    assert envelope is not None
    assert store.write(
        key, envelope._replace(fresh_until=envelope.fresh_until - 3600), 3600, store.generation(key), ""
    )
    probe.data = "v2"
    # The request that wins the refill renders the page through its own middleware, is served
    # that, and stores it.
    assert text(alice.get(url)) == "hello alice nick=None v2"
    assert text(alice.get(url)) == "hello alice nick=None v2"
    assert probe.count("per_user") == 2
    assert counter("swr.refill.succeeded") == 1


@pytest.mark.django_db
@pytest.mark.parametrize("flavor", FLAVORS)
def test_with_the_cache_down_pages_are_still_judged_on_the_final_response(flavor: str) -> None:
    """The per-process fallback keeps only pages that pass the final test."""
    breakers.trip("cache 'default'", "down for the test", 60)
    first, second = Visitor(flavor, enforce_csrf_checks=True), Visitor(flavor, enforce_csrf_checks=True)
    first_token = csrf_token(first.get(page(flavor, "form")))
    second_token = csrf_token(second.get(page(flavor, "form")))
    assert second_token != first_token
    assert text(second.post(page(flavor, "form"), {"csrfmiddlewaretoken": second_token})) == "posted"
    assert text(first.get(page(flavor, "plain"))) == "plain v1"
    assert text(second.get(page(flavor, "plain"))) == "plain v1"
    assert probe.count("plain") == 1  # kept in the process while the cache is down


def test_a_caller_that_did_not_wait_for_the_claim_stores_only_what_passes() -> None:
    """The token-less write of a caller that gave up waiting is judged like the claim holder's."""
    url = page("sync", "impatient-form")
    probe.hold = True
    with ThreadPoolExecutor(1) as thread:
        holder = thread.submit(lambda: csrf_token(Visitor("sync").get(url)))
        assert probe.holding.wait(10), "the claim holder never started rendering"
        probe.hold = False
        second = Visitor("sync", enforce_csrf_checks=True)
        second_token = csrf_token(second.get(url))  # the claim is held: renders itself
        probe.release.set()
        first_token = holder.result(timeout=30)
    third = Visitor("sync", enforce_csrf_checks=True)
    third_token = csrf_token(third.get(url))
    assert len({first_token, second_token, third_token}) == 3
    assert text(third.post(url, {"csrfmiddlewaretoken": third_token})) == "posted"
    assert probe.count("form") == 3


# -- refills render through the whole stack ------------------------------------------------------------------


def make_stale(view: Any, url: str, **headers: str) -> None:
    """Age the entry that a GET of *url* with *headers* reads, so the next read refills it."""
    meta = {f"HTTP_{name.upper()}": value for name, value in headers.items()}
    request = RequestFactory().get(url, **meta)
    with translation.override(headers.get("Accept_Language", settings.LANGUAGE_CODE)):
        key = view._django_scale_page.key(request, (), {})
    store = store_for("default")
    envelope = store.get(key)
    assert envelope is not None, f"no entry for {url} {headers}"
    stale = Envelope(
        MARKER, envelope.value, envelope.created, envelope.fresh_until - 3600, envelope.stale_until
    )
    assert store.write(key, stale, 3600, store.generation(key), "")


def languages_refilled(refilled: Callable[[], None]) -> None:
    url = page("sync", "language")
    assert text(Visitor("sync").get(url, Accept_Language="fr")) == "lang=fr v1"
    assert text(Visitor("sync").get(url, Accept_Language="de")) == "lang=de v1"
    make_stale(pages.language, url, Accept_Language="fr")
    make_stale(pages.language, url, Accept_Language="de")
    probe.data = "v2"
    assert text(Visitor("sync").get(url, Accept_Language="fr")) == "lang=fr v1"  # stale, refill claimed
    assert text(Visitor("sync").get(url, Accept_Language="de")) == "lang=de v1"
    refilled()
    assert counter("swr.refill.succeeded") == 2
    assert text(Visitor("sync").get(url, Accept_Language="fr")) == "lang=fr v2"
    assert text(Visitor("sync").get(url, Accept_Language="de")) == "lang=de v2"
    assert sorted(probe.calls) == [
        ("language", "de"),
        ("language", "de"),
        ("language", "fr"),
        ("language", "fr"),
    ]


def test_the_celery_refill_renders_the_language_of_the_entry(locale: None, celery_worker: Any) -> None:
    languages_refilled(lambda: wait_until(lambda: counter("swr.refill.succeeded") == 2, "two refills"))


def test_with_the_broker_down_the_publisher_renders_the_language_of_the_entry(locale: None) -> None:
    """The refill publisher's fallback renders through the same WSGI stack as the worker."""
    breakers.trip("the Celery broker", "down for the test", 60)
    languages_refilled(lambda: wait_for_refills())


def test_a_refill_that_does_not_reproduce_its_key_writes_nothing() -> None:
    """A refill whose arguments lead to another view (a forged message) raises instead of writing."""
    from django_scale.exceptions import PageRefillError

    request = RequestFactory().get("/iso/sync/plain/?q=1")
    view = pages.plain._django_scale_page
    arguments = view.parts(request, (), {})
    engine = pages.plain._django_scale_engine
    assert engine.key_of(arguments) == view.key(request, (), {})
    forged = {**arguments, "path": "/iso/async/plain/", "path_info": "/iso/async/plain/"}
    assert engine.key_of(forged) != engine.key_of(arguments)
    # On a thread of its own, as on a worker or the refill publisher (the request signals close
    # the thread's database connections).
    with ThreadPoolExecutor(1) as thread:
        with pytest.raises(PageRefillError, match="did not reproduce"):
            thread.submit(engine.rebuild(forged)).result()
        assert thread.submit(engine.rebuild(arguments)).result()[2] == b"plain v1"


# -- ScaleMiddleware sees the final response -------------------------------------------------------------------


@pytest.mark.parametrize(
    "stack",
    [
        pytest.param([m for m in settings.MIDDLEWARE if m != SCALE], id="missing"),
        pytest.param([*[m for m in settings.MIDDLEWARE if m != SCALE], SCALE], id="not-first"),
    ],
)
def test_without_scale_middleware_first_pages_are_served_uncached(
    stack: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with override_settings(MIDDLEWARE=stack), caplog.at_level(logging.WARNING, "django_scale.cache"):
        for _ in range(3):
            assert text(Client().get(page("sync", "plain"))) == "plain v1"
    assert probe.count("plain") == 3
    assert len([r for r in caplog.records if "ScaleMiddleware" in r.getMessage()]) == 1


def test_a_page_reached_before_any_cached_view_was_known_renders_live_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # ScaleMiddleware opens no page slot while no view of the process is cached (page_paths
    # empty): the request that first imports the URLconf reaches a cached view without one.
    from django_scale.cache.pages import page_paths

    known = set(page_paths)
    page_paths.clear()
    try:
        with caplog.at_level(logging.WARNING, "django_scale.cache"):
            assert text(Client().get(page("sync", "plain"))) == "plain v1"
    finally:
        page_paths.update(known)
    assert not [r for r in caplog.records if "ScaleMiddleware" in r.getMessage()]
    # The next requests get a slot: the page is stored, then served from the cache.
    assert text(Client().get(page("sync", "plain"))) == "plain v1"
    assert text(Client().get(page("sync", "plain"))) == "plain v1"
    assert probe.count("plain") == 2


def test_a_middleware_that_fails_after_the_view_releases_the_claim() -> None:
    url = page("sync", "plain")
    with override_settings(MIDDLEWARE=middleware("testapp.middleware.BoomMiddleware")):
        client = Client(raise_request_exception=False)
        assert client.get(url, headers={"X-Boom": "1"}).status_code == 500
        # Nothing was stored, and the claim is gone: the next request claims at once.
        assert text(client.get(url)) == "plain v1"
        assert text(client.get(url)) == "plain v1"
    assert probe.count("plain") == 2
    assert counter("swr.wait") == 0


def test_w210_pages_need_scale_middleware_first() -> None:
    from django_scale.cache.checks import check_cache
    from django_scale.cache.pages import page_paths

    assert "django_scale.W210" not in [m.id for m in check_cache()]
    with override_settings(MIDDLEWARE=[*[m for m in settings.MIDDLEWARE if m != SCALE], SCALE]):
        [message] = [m for m in check_cache() if m.id == "django_scale.W210"]
    # The views, sorted, five of them named.
    assert message.msg.startswith("testapp.cached.async_page, testapp.cached.page, ")
    assert f"and {len(page_paths) - 5} more are cached with swr_cache_page" in message.msg
    assert "ScaleMiddleware is not the first entry of MIDDLEWARE" in message.msg
    with override_settings(
        MIDDLEWARE=["testapp.middleware.ProjectScaleMiddleware", *settings.MIDDLEWARE[1:]]
    ):
        assert "django_scale.W210" not in [m.id for m in check_cache()]


def test_pages_are_cached_with_metrics_middleware_before_scale_middleware(tmp_path: Any) -> None:
    # MetricsMiddleware changes no response: ScaleMiddleware right after it still sees the
    # final one, so the page is stored and served from the cache.
    from django_scale.cache.checks import check_cache
    from django_scale.metrics.recording import disable
    from django_scale.testing import override_scale_settings

    metrics_first = ["django_scale.metrics.MetricsMiddleware", *settings.MIDDLEWARE]
    assert metrics_first[1] == SCALE
    try:
        with override_settings(MIDDLEWARE=metrics_first), override_scale_settings(METRICS_DIR=str(tmp_path)):
            assert "django_scale.W210" not in [m.id for m in check_cache()]
            assert text(Client().get(page("sync", "plain"))) == "plain v1"
            assert text(Client().get(page("sync", "plain"))) == "plain v1"
            # Any other middleware before it still keeps the final response from it.
            other_first = ["django.middleware.gzip.GZipMiddleware", *settings.MIDDLEWARE]
            with override_settings(MIDDLEWARE=other_first):
                assert "django_scale.W210" in [m.id for m in check_cache()]
    finally:
        disable()
    assert probe.count("plain") == 1
