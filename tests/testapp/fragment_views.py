"""Views whose templates cache a ``{% swrcache %}`` fragment, for tests/test_isolation_fragments.py.

Each fragment reads one per-user channel (the CSRF token, messages, the user, the session,
the language, the time zone). This module is also the URLconf of those tests
(``pytest.mark.urls``), so the suite's own ``testapp.urls`` is left alone.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.urls import path
from django.utils import timezone

from testapp.cached import probe


class Counted:
    """Renders as nothing and records that the fragment around it was rendered."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        probe.record(self.name, None)
        return ""


#: The fragments, by name: each body reads one channel; ``vary`` is the tag's vary values.
FRAGMENTS: dict[str, tuple[str, str]] = {
    "csrf": ("", '<form method="post">{% csrf_token %}</form>'),
    "messages": ("", "{% for message in messages %}<li>{{ message }}</li>{% endfor %}"),
    "user": ("", "Hello {{ user.get_username }}"),
    "request-user": ("", "Hello {{ request.user.get_username }}"),
    "perms": ("", "{% if perms.auth.add_user %}can add users{% else %}cannot add users{% endif %}"),
    "session": ("", "Cart: {{ request.session.cart }}"),
    "cookies": ("", "Theme: {{ request.COOKIES.theme }}"),
    "tag-session": ("", "{% load fragment_tags %}Cart: {% cart %}"),
    "include-user": ("", "{% include greeting %}"),
    "language": ("", "{% load i18n %}{% get_current_language as lang %}lang={{ lang }}"),
    "csp": ("", '<script nonce="{{ csp_nonce }}"></script>'),
    "timezone": ("", "{% now 'T' %}"),
    "vary-user": ("user", "Hello {{ user.get_username }}"),
    "vary-request-user-pk": ("request.user.pk", "Hello {{ request.user.get_username }}"),
    "vary-user-csrf": ("user", "{{ user.get_username }}<form>{% csrf_token %}</form>"),
    "vary-user-session": ("user", "{{ user.get_username }} {{ request.session.cart }}"),
    "url": ("", "{% url 'fragment' 'url' %} {{ request.path }} {{ request.GET.q }}"),
}


def fragment(request: HttpRequest, name: str) -> HttpResponse:
    """Render the fragment *name* (POST: the CSRF-protected target of the ``csrf`` form)."""
    if request.method == "POST":
        return HttpResponse("posted")
    if "tz" in request.GET:
        timezone.activate(request.GET["tz"])
    vary, body = FRAGMENTS[name]
    source = (
        f"{{% load scale %}}<main>{{% swrcache 60 3600 '{name}' {vary} %}}{{{{ counted }}}}{body}"
        "{% endswrcache %}</main>"
    )
    context: dict[str, Any] = {
        "counted": Counted(f"fragment:{name}"),
        "greeting": engines["django"].from_string("Hello {{ user.get_username }}"),
    }
    return HttpResponse(engines["django"].from_string(source).render(context, request))


def add_message(request: HttpRequest) -> HttpResponse:
    """Add a flash message for the next page (in the message storage of the settings)."""
    messages.info(request, request.GET["text"])
    return HttpResponse("added")


def set_cart(request: HttpRequest) -> HttpResponse:
    """Put a value in the visitor's session."""
    request.session["cart"] = request.GET["cart"]
    return HttpResponse("set")


urlpatterns = [
    path("fragment/<str:name>/", fragment, name="fragment"),
    path("messages/add/", add_message),
    path("cart/", set_cart),
]
