"""Isolation of ``{% swrcache %}``, from the attacker's side.

Alice (the victim) renders a page first; Bob (the attacker) renders it next and must never
receive anything of hers: not her CSRF token, her flash messages, her name or permissions,
her session, her language or time zone, and not a fragment of another model or queryset
that merely prints like his. Every test runs on the local-memory cache and, on the services
backend, on Redis.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import django
import otherapp.models
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.template import engines
from django.test import Client
from django.test.utils import override_settings
from support import counter, swr_cache

from django_scale import metrics
from django_scale.cache import reset_state
from django_scale.exceptions import CacheKeyError, DjangoScaleError, FragmentKeyError, PerUserFragmentError
from django_scale.templatetags import scale

import testapp.models
from testapp.cached import probe

pytestmark = pytest.mark.urls("testapp.fragment_views")


@pytest.fixture(autouse=True, params=["locmem", pytest.param("redis", marks=pytest.mark.redis)])
def fragment_cache(request: pytest.FixtureRequest) -> Iterator[str]:
    """The cache fragments are stored in: local memory, and Redis on the services backend."""
    probe.reset()
    metrics.reset()
    reset_state()
    scale.reset_state()  # each test sees its own log-once messages
    with swr_cache(request.param, "fragment-tests") as alias:
        yield alias
    reset_state()


def renders(name: str) -> int:
    """How many times the fragment *name* was rendered (not served from the cache)."""
    return probe.count(f"fragment:{name}")


def user(name: str, **extra: Any) -> Any:
    return get_user_model().objects.create_user(name, password="pw", **extra)


def logged_in(name: str, **extra: Any) -> Client:
    return logged_in_as(user(name, **extra))


def logged_in_as(account: Any) -> Client:
    client = Client()
    client.force_login(account)
    return client


def main(response: Any) -> str:
    """The page's ``<main>``: the fragment, as served."""
    assert response.status_code == 200, response.content
    match = re.search(r"<main>(.*)</main>", response.content.decode(), re.S)
    assert match, response.content
    return match.group(1)


# -- the CSRF token ---------------------------------------------------------------------------------


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def test_a_fragment_with_the_csrf_token_never_serves_alices_token_to_bob() -> None:
    alice, bob = Client(enforce_csrf_checks=True), Client(enforce_csrf_checks=True)
    alices_token = csrf_token(main(alice.get("/fragment/csrf/")))
    bobs_page = main(bob.get("/fragment/csrf/"))
    assert alices_token not in bobs_page
    # Bob's own token works for Bob; Alice's still works for Alice.
    assert bob.post("/fragment/csrf/", {"csrfmiddlewaretoken": csrf_token(bobs_page)}).status_code == 200
    assert alice.post("/fragment/csrf/", {"csrfmiddlewaretoken": alices_token}).status_code == 200
    assert renders("csrf") == 2


@pytest.mark.django_db
def test_the_csrf_token_is_never_covered_by_the_user() -> None:
    alice, bob = logged_in("alice"), logged_in("bob")
    alices_page = main(alice.get("/fragment/vary-user-csrf/"))
    again = main(alice.get("/fragment/vary-user-csrf/"))
    # Not even Alice's next page gets her old fragment: a token is for one response.
    assert renders("vary-user-csrf") == 2
    assert csrf_token(alices_page) not in main(bob.get("/fragment/vary-user-csrf/"))
    assert "alice" in again


if django.VERSION >= (6, 0):  # Django 6.0 added CSP nonces; older versions have no such channel

    def test_alices_csp_nonce_is_never_served_to_bob() -> None:
        [templates] = settings.TEMPLATES
        options = templates["OPTIONS"]
        processors = [*options["context_processors"], "django.template.context_processors.csp"]
        with override_settings(
            TEMPLATES=[{**templates, "OPTIONS": {**options, "context_processors": processors}}],
            MIDDLEWARE=[*settings.MIDDLEWARE, "django.middleware.csp.ContentSecurityPolicyMiddleware"],
        ):
            alices = re.search(r'nonce="([^"]+)"', main(Client().get("/fragment/csp/")))
            bobs = re.search(r'nonce="([^"]+)"', main(Client().get("/fragment/csp/")))
        assert alices and bobs
        assert alices.group(1) != bobs.group(1)
        assert renders("csp") == 2


# -- flash messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "storage",
    [
        "django.contrib.messages.storage.fallback.FallbackStorage",
        "django.contrib.messages.storage.cookie.CookieStorage",
        "django.contrib.messages.storage.session.SessionStorage",
    ],
)
@pytest.mark.django_db
def test_alices_flash_messages_are_never_served_to_bob(storage: str) -> None:
    alice, bob = Client(), Client()
    with override_settings(MESSAGE_STORAGE=storage):
        alice.get("/messages/add/", {"text": "alice-secret-message"})
        assert "alice-secret-message" in main(alice.get("/fragment/messages/"))
        bob.get("/messages/add/", {"text": "bob-message"})
        bobs = main(bob.get("/fragment/messages/"))
    assert "alice-secret-message" not in bobs
    assert "bob-message" in bobs


# -- the user and their permissions -------------------------------------------------------------------


@pytest.mark.parametrize("fragment", ["user", "request-user", "include-user"])
@pytest.mark.django_db
def test_alices_name_is_never_served_to_bob(fragment: str) -> None:
    alice, bob = logged_in("alice"), logged_in("bob")
    assert "Hello alice" in main(alice.get(f"/fragment/{fragment}/"))
    bobs = main(bob.get(f"/fragment/{fragment}/"))
    assert "alice" not in bobs
    assert "Hello bob" in bobs
    anonymous = main(Client().get(f"/fragment/{fragment}/"))
    assert "alice" not in anonymous
    assert "bob" not in anonymous


@pytest.mark.django_db
def test_alices_permissions_are_never_served_to_bob() -> None:
    alice, bob = logged_in("alice", is_superuser=True), logged_in("bob")
    assert "can add users" in main(alice.get("/fragment/perms/"))
    assert "cannot add users" in main(bob.get("/fragment/perms/"))


@pytest.mark.parametrize("fragment", ["vary-user", "vary-request-user-pk"])
@pytest.mark.django_db
def test_a_fragment_that_varies_on_the_user_is_cached_per_user(fragment: str) -> None:
    alice, bob = logged_in("alice"), logged_in("bob")
    assert "Hello alice" in main(alice.get(f"/fragment/{fragment}/"))
    assert "Hello bob" in main(bob.get(f"/fragment/{fragment}/"))
    assert "Hello alice" in main(alice.get(f"/fragment/{fragment}/"))
    assert "Hello bob" in main(bob.get(f"/fragment/{fragment}/"))
    assert renders(fragment) == 2


@pytest.mark.django_db
def test_anonymous_visitors_share_one_entry_when_the_fragment_varies_on_the_user() -> None:
    first, second = Client(), Client()
    assert main(first.get("/fragment/vary-user/")) == main(second.get("/fragment/vary-user/")) == "Hello "
    assert renders("vary-user") == 1
    assert "Hello alice" in main(logged_in("alice").get("/fragment/vary-user/"))
    assert renders("vary-user") == 2


@pytest.mark.django_db
def test_varying_on_the_user_does_not_cover_the_session() -> None:
    alice, bob = logged_in("alice"), logged_in("bob")
    alice.get("/cart/", {"cart": "alice-cart"})
    assert "alice alice-cart" in main(alice.get("/fragment/vary-user-session/"))
    bob.get("/cart/", {"cart": "bob-cart"})
    assert "bob bob-cart" in main(bob.get("/fragment/vary-user-session/"))
    alice.get("/cart/", {"cart": "alice-new-cart"})
    assert "alice alice-new-cart" in main(alice.get("/fragment/vary-user-session/"))


# -- the session, cookies ----------------------------------------------------------------------------


@pytest.mark.parametrize("fragment", ["session", "tag-session"])
@pytest.mark.django_db
def test_alices_session_is_never_served_to_bob(fragment: str) -> None:
    alice, bob = Client(), Client()
    alice.get("/cart/", {"cart": "alice-secret-cart"})
    assert "alice-secret-cart" in main(alice.get(f"/fragment/{fragment}/"))
    bob.get("/cart/", {"cart": "bob-cart"})
    bobs = main(bob.get(f"/fragment/{fragment}/"))
    assert "alice-secret-cart" not in bobs
    assert "bob-cart" in bobs


def test_alices_cookies_are_never_served_to_bob() -> None:
    alice, bob = Client(), Client()
    alice.cookies["theme"] = "alice-secret-theme"
    assert "alice-secret-theme" in main(alice.get("/fragment/cookies/"))
    assert "alice-secret-theme" not in main(bob.get("/fragment/cookies/"))


# -- language and time zone ---------------------------------------------------------------------------


@pytest.fixture
def locale_middleware() -> Iterator[None]:
    middleware = list(settings.MIDDLEWARE)
    middleware.insert(
        middleware.index("django.contrib.sessions.middleware.SessionMiddleware") + 1,
        "django.middleware.locale.LocaleMiddleware",
    )
    with override_settings(MIDDLEWARE=middleware):
        yield


@pytest.mark.parametrize("by", ["header", "cookie"])
def test_alices_language_is_never_served_to_bob(by: str, locale_middleware: None) -> None:
    alice, bob = Client(), Client()

    def speak(client: Client, language: str) -> dict[str, Any]:
        if by == "cookie":
            client.cookies[settings.LANGUAGE_COOKIE_NAME] = language
            return {}
        return {"headers": {"Accept-Language": language}}

    assert "lang=fr" in main(alice.get("/fragment/language/", **speak(alice, "fr")))
    assert "lang=de" in main(bob.get("/fragment/language/", **speak(bob, "de")))
    assert "lang=fr" in main(alice.get("/fragment/language/", **speak(alice, "fr")))
    assert renders("language") == 2


def test_alices_time_zone_is_never_served_to_bob() -> None:
    alice, bob = Client(), Client()
    assert "JST" in main(alice.get("/fragment/timezone/", {"tz": "Asia/Tokyo"}))
    assert "JST" not in main(bob.get("/fragment/timezone/", {"tz": "America/New_York"}))


# -- what is still shared ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_fragment_of_urls_and_the_path_is_shared() -> None:
    alice, bob = logged_in("alice"), Client()
    assert main(alice.get("/fragment/url/")) == main(bob.get("/fragment/url/"))
    assert renders("url") == 1


# -- model instances, querysets, objects ------------------------------------------------------------


def render(source: str, **context: Any) -> str:
    return engines["django"].from_string("{% load scale %}" + source).render(context)


CARD = "{% swrcache 60 3600 'card' item %}{{ item }}{% endswrcache %}"


@pytest.mark.django_db
def test_models_named_alike_in_two_apps_never_share_a_fragment() -> None:
    reporter = testapp.models.Reporter.objects.create(name="r")
    testapp.models.Post.objects.create(pk=4242, reporter=reporter, title="alice-secret-post")
    otherapp.models.Post.objects.create(pk=4242, title="bob-post")
    assert render(CARD, item=testapp.models.Post.objects.get(pk=4242)) == "alice-secret-post"
    assert render(CARD, item=otherapp.models.Post.objects.get(pk=4242)) == "bob-post"


@pytest.mark.django_db
def test_a_proxy_is_keyed_by_its_own_model() -> None:
    author = testapp.models.Author.objects.create(name="alice")
    assert render(CARD, item=author) == "alice"
    assert render(CARD, item=otherapp.models.Author.objects.get(pk=author.pk)) == "proxy of alice"


@pytest.mark.django_db
def test_querysets_that_print_alike_never_share_a_fragment() -> None:
    for n in range(20):
        testapp.models.Author.objects.create(name=f"shared-{n:02}")
    testapp.models.Author.objects.create(name="zz-alice-secret")
    testapp.models.Author.objects.create(name="zz-bob")
    authors = testapp.models.Author.objects.order_by("name")
    listing = (
        "{% swrcache 60 3600 'authors' items %}{% for a in items %}{{ a }} {% endfor %}{% endswrcache %}"
    )
    alices, bobs = authors.exclude(name="zz-bob"), authors.exclude(name="zz-alice-secret")
    assert str(alices) == str(bobs)  # the first 20, then "remaining elements truncated"
    assert "zz-alice-secret" in render(listing, items=alices)
    assert "zz-alice-secret" not in render(listing, items=bobs)


class Opaque:
    """An object with no stable key: every instance prints the same."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __str__(self) -> str:
        return "opaque"


OPAQUE = "{% swrcache 60 3600 'opaque' thing %}{{ thing.secret }}{% endswrcache %}"


def test_objects_without_a_stable_key_are_rendered_uncached_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="django_scale.cache"):
        assert render(OPAQUE, thing=Opaque("alice-secret")) == "alice-secret"
        assert render(OPAQUE, thing=Opaque("bob")) == "bob"
    warnings = [r for r in caplog.records if "opaque" in r.getMessage() and "Opaque" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(lambda: testapp.models.Author.objects.all(), id="queryset"),
        pytest.param(lambda: Opaque("x"), id="object"),
        pytest.param(lambda: testapp.models.Author(name="unsaved"), id="unsaved-instance"),
        pytest.param(lambda: {"a": 1}, id="dict"),
        pytest.param(lambda: [1, Opaque("x")], id="list-with-an-object"),
    ],
)
def test_in_debug_a_value_without_a_stable_key_is_an_error(value: Any) -> None:
    with override_settings(DEBUG=True), pytest.raises(FragmentKeyError, match="'opaque'") as raised:
        render(OPAQUE, thing=value())
    assert isinstance(raised.value, CacheKeyError)
    assert isinstance(raised.value, DjangoScaleError)


@pytest.mark.django_db
def test_stable_values_key_fragments() -> None:
    import datetime
    import decimal
    import uuid

    values = [
        None,
        "1",
        1,
        1.5,
        True,
        decimal.Decimal("1.5"),
        datetime.date(2024, 1, 2),
        datetime.datetime(2024, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
        uuid.UUID(int=1),
        testapp.models.Author.objects.create(name="a"),
        AnonymousUser(),
        [1, "a"],
        ("b", 2),
    ]
    with override_settings(DEBUG=True):
        for n, value in enumerate(values):
            assert render("{% swrcache 60 3600 'stable' v %}{{ n }}{% endswrcache %}", v=value, n=n) == str(n)
            # Cached: a second render with another n serves the first.
            assert render("{% swrcache 60 3600 'stable' v %}{{ n }}{% endswrcache %}", v=value, n=-1) == str(
                n
            )


def test_in_debug_a_fragment_reading_a_per_user_channel_is_an_error() -> None:
    with override_settings(DEBUG=True), pytest.raises(PerUserFragmentError, match="CSRF token"):
        Client().get("/fragment/csrf/")


@pytest.mark.django_db
def test_a_per_user_render_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    alice, bob = logged_in("alice"), logged_in("bob")
    with caplog.at_level(logging.WARNING, logger="django_scale.cache"):
        alice.get("/fragment/user/")
        bob.get("/fragment/user/")
    logged = [r for r in caplog.records if "'user'" in r.getMessage()]
    assert len(logged) == 1
    assert "the user" in logged[0].getMessage()
    assert counter("swr.fragment.per_user") == 2


@pytest.mark.django_db
def test_visitors_of_a_per_user_fragment_do_not_queue_for_the_cache() -> None:
    users = [user(f"user{n}") for n in range(5)]
    assert "Hello user0" in main(logged_in_as(users[0]).get("/fragment/user/"))
    assert counter("swr.miss") == 1
    # The fragment is known to be per-user: the next visitors render it without claiming it
    # in the cache, so concurrent visitors never wait for each other's render.
    pages = [main(logged_in_as(u).get("/fragment/user/")) for u in users]
    assert pages == [f"Hello user{n}" for n in range(5)]
    assert counter("swr.miss") == 1
    assert counter("swr.wait") == 0
    assert renders("user") == 6
