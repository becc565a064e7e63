"""The load a news site sees, as requests for the generator, and the staff login it needs.

The mix (shares of requests, drawn in a fixed pseudo-random order): the front page 30 %, a
section's page 25 %, an article 38.75 % (Zipf over the published articles, the newest most
read: rank *r* has weight ``1 / r``), the admin's article changelist filtered by status and
section 2.5 %, the changelist searched by a word of the headlines 2.5 %, a reader's comment
(a POST with the CSRF token) 0.75 % and an editor's save of an article in the admin (its
change form POSTed as it stands) 0.5 %: 1.25 % writes.

Users are browsers (:class:`~benchmarks.site.loadgen.Browser`): they keep the cookies the
site sets and send them back, and follow the redirect a saved form answers, at once. The
admin pages and the edits come from the logged-in staff user; a comment from one of
:data:`COMMENTERS` readers, each with a CSRF cookie, who is then sent back to the article
("article after comment"); an edit's redirect is the changelist ("changelist after edit").
Readers of pages send no cookies. Read-your-writes rides on these cookies (django-scale's
write position; django-multidb-router's pin of a writer's reads to the primary for 15 s), so
the reads after a write are where the configurations differ on the primary.
"""

from __future__ import annotations

import bisect
import http.client
import itertools
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from benchmarks.site.loadgen import Browser, Request

__all__ = ["FOLLOWS", "PAGES", "Mix", "alone", "edit_forms", "login"]

#: (page, share of requests).
PAGES = (
    ("front page", 0.30),
    ("section", 0.25),
    ("article", 0.3875),
    ("admin filtered", 0.025),
    ("admin search", 0.025),
    ("comment (POST)", 0.0075),
    ("admin edit (POST)", 0.005),
)
#: The pages a browser goes to at once after a write (the redirects it follows), by the write.
FOLLOWS = {"comment (POST)": "article after comment", "admin edit (POST)": "changelist after edit"}
#: Words of the demo's headlines the admin search looks for.
SEARCH_WORDS = ("budget", "stadium", "climate", "rail", "tax", "vaccine", "housing")
#: Readers who comment (each with its own cookies: the CSRF token, what a comment sets).
COMMENTERS = 16
#: The newest published articles the editors save (their change forms, read before the load).
EDITED = 50


def login(host: str, port: int, username: str, password: str) -> Browser:
    """Log in to the admin as a browser does (GET the form, POST it); return the browser,
    holding the session's and the CSRF token's cookies (what :meth:`Browser.reset` keeps)."""
    jar = Browser()
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("GET", "/admin/login/")
        response = connection.getresponse()
        response.read()
        jar.take(response.headers.get_all("Set-Cookie") or [])
        csrftoken = jar.get("csrftoken")
        if response.status != 200 or not csrftoken:
            raise RuntimeError(f"GET /admin/login/ answered {response.status} without a CSRF cookie")
        body = urlencode(
            {"csrfmiddlewaretoken": csrftoken, "username": username, "password": password, "next": "/admin/"}
        )
        connection.request(
            "POST",
            "/admin/login/",
            body,
            {"Content-Type": "application/x-www-form-urlencoded", "Cookie": jar.header()},
        )
        response = connection.getresponse()
        response.read()
        jar.take(response.headers.get_all("Set-Cookie") or [])
        if response.status != 302 or not jar.get("sessionid"):
            raise RuntimeError(f"POST /admin/login/ answered {response.status}: the login failed")
        return Browser({"sessionid": jar.get("sessionid"), "csrftoken": jar.get("csrftoken")})
    finally:
        connection.close()


def edit_forms(count: int = EDITED) -> list[tuple[int, bytes]]:
    """The admin change forms of the *count* newest published articles, as an editor who
    saves each unchanged POSTs it: (primary key, urlencoded body). Read with the ORM before
    the load; the forms carry every field (the tags too, which a form without them clears)
    and an empty comments inline."""
    from django.utils import timezone

    from news.models import Article

    forms = []
    articles = Article.objects.filter(status=Article.Status.PUBLISHED).order_by("-published_at")
    for article in articles.prefetch_related("tags")[:count]:
        published = timezone.localtime(article.published_at)
        fields: dict[str, Any] = {
            "section": article.section_id,
            "author": article.author_id,
            "title": article.title,
            "slug": article.slug,
            "body": article.body,
            "published_at_0": published.strftime("%Y-%m-%d"),
            "published_at_1": published.strftime("%H:%M:%S.%f"),
            "status": article.status,
            "tags": [tag.pk for tag in article.tags.all()],
            "views": article.views,
            "comments-TOTAL_FORMS": 0,
            "comments-INITIAL_FORMS": 0,
            "comments-MIN_NUM_FORMS": 0,
            "comments-MAX_NUM_FORMS": 1000,
            "_save": "Save",
        }
        forms.append((article.pk, urlencode(fields, doseq=True).encode()))
    return forms


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
        self,
        articles: int,
        sections: list[tuple[int, str]],
        staff: Browser,
        edits: Sequence[tuple[int, bytes]],
        seed: int = 15,
    ) -> None:
        if not edits:
            raise ValueError("Mix() needs the change form of at least one article to edit (edit_forms())")
        self.articles = articles
        self.sections = sections
        self.staff = staff
        self.edits = list(edits)
        # A CSRF cookie as the site would have set it (32 letters: Django's unmasked secret).
        self.commenters = [Browser({"csrftoken": f"reader{n:02d}".ljust(32, "x")}) for n in range(COMMENTERS)]
        self.seed = seed
        self.rng = random.Random(seed)
        published = articles - articles // 10
        self.zipf = list(itertools.accumulate(1 / rank for rank in range(1, published + 1)))
        self.page_cdf = list(itertools.accumulate(share for _, share in PAGES))

    def restart(self) -> Mix:
        """Start the draws again from the seed, and the users with their first cookies only;
        return the mix. Each fixed-rate phase restarts it, so that every configuration gets
        the same requests in the same order: at 1.25 % writes, a phase of 200 requests
        otherwise sends anything from none to six."""
        self.rng.seed(self.seed)
        for browser in (self.staff, *self.commenters):
            browser.reset()
        return self

    def article(self) -> int:
        rank = bisect.bisect_left(self.zipf, self.rng.random() * self.zipf[-1]) + 1
        return published_article(self.articles, min(rank, len(self.zipf)))

    def __call__(self, i: int) -> Request:
        draw = self.rng.random() * self.page_cdf[-1]
        page = PAGES[min(bisect.bisect_left(self.page_cdf, draw), len(PAGES) - 1)][0]
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
                browser=self.staff,
            )
        if page == "admin search":
            return Request(
                page, f"/admin/news/article/?q={self.rng.choice(SEARCH_WORDS)}", browser=self.staff
            )
        if page == "admin edit (POST)":
            pk, body = self.edits[self.rng.randrange(len(self.edits))]
            return _post(page, f"/admin/news/article/{pk}/change/", body, self.staff)
        body = urlencode({"author_name": f"Reader {i % 97}", "body": f"Comment {i} of the load."}).encode()
        path = f"/articles/article-{self.article()}/comments/"
        return _post("comment (POST)", path, body, self.commenters[i % COMMENTERS])


def _post(page: str, path: str, body: bytes, browser: Browser) -> Request:
    """A form's POST from *browser*, with its CSRF token, following the redirect it answers."""
    return Request(
        page,
        path,
        method="POST",
        body=body,
        headers=(
            ("X-CSRFToken", browser.get("csrftoken")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ),
        browser=browser,
        redirect_as=FOLLOWS[page],
    )


def alone(request: Request) -> Request:
    """*request* without the redirect it would follow: a page sent alone is that page only."""
    return replace(request, redirect_as=None)
