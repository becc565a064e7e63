"""The load a news site sees, as requests for the generator, and the staff login it needs.

The mix (shares of requests, drawn in a fixed pseudo-random order): the front page 30 %, a
section's page 25 %, an article 38.5 % (Zipf over the published articles, the newest most
read: rank *r* has weight ``1 / r``), the admin's article changelist filtered by status and
section 2.5 %, the changelist searched by a word of the headlines 2.5 %, and a reader's
comment (a POST with the CSRF token) 1.5 %. Admin pages and comments carry the logged-in
staff user's cookies; readers send none.
"""

from __future__ import annotations

import bisect
import http.client
import itertools
import random
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from benchmarks.site.loadgen import Request

__all__ = ["PAGES", "Mix", "Session", "login"]

#: (page, share of requests).
PAGES = (
    ("front page", 0.30),
    ("section", 0.25),
    ("article", 0.385),
    ("admin filtered", 0.025),
    ("admin search", 0.025),
    ("comment (POST)", 0.015),
)
#: Words of the demo's headlines the admin search looks for.
SEARCH_WORDS = ("budget", "stadium", "climate", "rail", "tax", "vaccine", "housing")


@dataclass(frozen=True)
class Session:
    """The staff user's cookies: the session and the CSRF token."""

    sessionid: str
    csrftoken: str

    def cookie(self) -> str:
        return f"csrftoken={self.csrftoken}; sessionid={self.sessionid}"


def _cookies(response: http.client.HTTPResponse) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_all("Set-Cookie") or []:
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


def login(host: str, port: int, username: str, password: str) -> Session:
    """Log in to the admin as a browser does (GET the form, POST it); return the cookies."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("GET", "/admin/login/")
        response = connection.getresponse()
        response.read()
        csrftoken = _cookies(response).get("csrftoken", "")
        if response.status != 200 or not csrftoken:
            raise RuntimeError(f"GET /admin/login/ answered {response.status} without a CSRF cookie")
        body = urlencode(
            {"csrfmiddlewaretoken": csrftoken, "username": username, "password": password, "next": "/admin/"}
        )
        connection.request(
            "POST",
            "/admin/login/",
            body,
            {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"csrftoken={csrftoken}"},
        )
        response = connection.getresponse()
        response.read()
        cookies = _cookies(response)
        if response.status != 302 or "sessionid" not in cookies:
            raise RuntimeError(f"POST /admin/login/ answered {response.status}: the login failed")
        return Session(cookies["sessionid"], cookies.get("csrftoken", csrftoken))
    finally:
        connection.close()


def published_article(articles: int, rank: int) -> int:
    """Return the number of the *rank*-th newest published article (1 is the newest).

    Articles 1..*articles* are published but every tenth (``seed.is_published``).
    """
    published = articles - articles // 10
    index = published - rank  # 0-based, oldest first
    return index + index // 9 + 1


class Mix:
    """``mix(i)`` is the i-th request of the load (call in order: the draws are sequential)."""

    def __init__(
        self, articles: int, sections: list[tuple[int, str]], session: Session, seed: int = 15
    ) -> None:
        self.articles = articles
        self.sections = sections
        self.session = session
        self.seed = seed
        self.rng = random.Random(seed)
        published = articles - articles // 10
        self.zipf = list(itertools.accumulate(1 / rank for rank in range(1, published + 1)))
        self.page_cdf = list(itertools.accumulate(share for _, share in PAGES))

    def restart(self) -> Mix:
        """Start the draws again from the seed; return the mix. Each fixed-rate phase restarts
        it, so that every configuration gets the same requests in the same order: at 1.5 %
        comments, a phase of 200 requests otherwise sends anything from none to eight."""
        self.rng.seed(self.seed)
        return self

    def article(self) -> int:
        rank = bisect.bisect_left(self.zipf, self.rng.random() * self.zipf[-1]) + 1
        return published_article(self.articles, min(rank, len(self.zipf)))

    def __call__(self, i: int) -> Request:
        draw = self.rng.random() * self.page_cdf[-1]
        page = PAGES[min(bisect.bisect_left(self.page_cdf, draw), len(PAGES) - 1)][0]
        staff = (("Cookie", self.session.cookie()),)
        section_id, section_slug = self.sections[self.rng.randrange(len(self.sections))]
        if page == "front page":
            return Request(page, "/")
        if page == "section":
            return Request(page, f"/sections/{section_slug}/")
        if page == "article":
            return Request(page, f"/articles/article-{self.article()}/")
        if page == "admin filtered":
            return Request(
                page,
                f"/admin/news/article/?section__id__exact={section_id}&status__exact=published",
                headers=staff,
            )
        if page == "admin search":
            return Request(page, f"/admin/news/article/?q={self.rng.choice(SEARCH_WORDS)}", headers=staff)
        body = urlencode({"author_name": f"Reader {i % 97}", "body": f"Comment {i} of the load."}).encode()
        return Request(
            page,
            f"/articles/article-{self.article()}/comments/",
            method="POST",
            body=body,
            headers=(
                *staff,
                ("X-CSRFToken", self.session.csrftoken),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ),
        )
