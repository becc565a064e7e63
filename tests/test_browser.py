"""ScaleModelAdmin in a real browser: headless Chromium (Playwright) against the live server.

Log in, open the article changelist, filter, search, follow the "next" links to the last
page, open an article, edit and save it. On the PostgreSQL backend the admin's GET pages read
from the real standby, and the page after the save shows the user's own write while the
standby's replay is paused.

The test needs the ``playwright`` package (the ``test`` extra) and Debian's ``chromium``;
``DJANGO_SCALE_TEST_CHROMIUM`` names another Chromium binary. Playwright's own browser
downloads are not used. When either is missing the test is skipped, except under ``CI``,
where it fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from django.contrib.auth.models import User
from django.db import connections

from django_scale.replicas import monitor, parse_lsn
from django_scale.testing import pause_replay, resume_replay

import harness
from testapp.models import Article, Author

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page
    from pytest_django.live_server_helper import LiveServer

T = TypeVar("T")

CHANGELIST = "/admin/testapp/article/"
#: Ada wrote articles 000-069, Grace 070-119, Hedy 120-129; the even ones are on replicas.
AUTHORS = {"Ada": range(70), "Grace": range(70, 120), "Hedy": range(120, 130)}
PER_PAGE = 20  # ArticleAdmin.list_per_page
EDITED = " (revised in a browser)"


@contextmanager
def _browser(executable: str) -> Iterator[Browser]:
    """Headless Chromium, closed with its Playwright driver at the end of the block.

    Not a fixture: while Playwright's sync API is active, its event loop counts as running in
    this thread and Django refuses ORM calls here, so the test sets up its data before the
    block and checks the database after it (and the fixtures' teardown flushes it after).
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _in_own_thread(function: Callable[[], T]) -> T:
    """Run *function* in a thread of its own, on database connections of its own.

    Between calls, Playwright's sync API leaves its event loop marked as running in the
    test's thread, where Django refuses ORM calls (``SynchronousOnlyOperation``). Only for
    PostgreSQL: an in-memory SQLite database is one connection, shared with the live server.
    """

    def run() -> T:
        try:
            return function()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def _catch_up(replica: Any) -> None:
    """Wait until the standby, and this process's monitor of it, have everything written so far."""
    target = parse_lsn(replica.primary_lsn())
    replica.wait_for_replay()
    assert monitor("replica").wait_for(target, 10), "the replica monitor did not see the replay"


def _titles(page: Page) -> list[str]:
    return page.locator("#result_list tbody th.field-title a").all_inner_texts()


def _next_link(page: Page, number: int) -> Locator:
    """The link to page *number* + 1 in the paginator (Django 4.2 to 6.1 markup)."""
    return page.locator(".paginator a[href*='p=']").filter(has_text=re.compile(rf"^\s*{number + 1}\s*$"))


def _walk(page: Page) -> tuple[list[list[str]], str]:
    """Follow "next" from page 1 to the end; return each page's titles and the last paginator text."""
    pages = [_titles(page)]
    number = 1
    while _next_link(page, number).count():
        link = _next_link(page, number)
        # The keyset cursor rides on the link to the next page, and only there.
        assert "_after=" in (link.get_attribute("href") or "")
        assert page.locator(".paginator a[href*='_after=']").count() == 1
        link.click()
        number += 1
        page.wait_for_url(re.compile(rf"[?&]p={number}(&|$)"))
        titles = _titles(page)
        assert titles, f"page {number} is empty"
        pages.append(titles)
    return pages, page.locator(".paginator").inner_text()


def _screenshot(page: Page, directory: Path, name: str) -> None:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def _title(number: int) -> str:
    return f"Article {number:03} on {'replicas' if number % 2 == 0 else 'paging'}"


def _titles_of(numbers: Iterable[int]) -> list[str]:
    return sorted(_title(number) for number in numbers)


def _log_in(page: Page) -> None:
    page.goto(f"/admin/login/?next={CHANGELIST}")
    page.fill("#id_username", "editor")
    page.fill("#id_password", "pw")
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(rf"{re.escape(CHANGELIST)}$"))


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_admin_works_in_a_browser(
    live_server: LiveServer, chromium: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    on_postgres = harness.BACKEND != "sqlite"
    User.objects.create_superuser("editor", "editor@example.com", "pw")
    authors = {name: Author.objects.create(name=name) for name in AUTHORS}
    Article.objects.bulk_create(
        Article(author=authors[name], title=_title(number))
        for name, numbers in AUTHORS.items()
        for number in numbers
    )
    ada = f"author__id__exact={authors['Ada'].pk}"
    replica = request.getfixturevalue("replica") if on_postgres else None
    if replica is not None:
        with connections["default"].cursor() as cursor:
            cursor.execute("ANALYZE testapp_article")
        _catch_up(replica)

    with _browser(chromium) as browser, browser.new_context(base_url=live_server.url) as context:
        page = context.new_page()
        _log_in(page)

        # The first page: the 20 newest articles, and the count as ScaleModelAdmin shows it:
        # an estimate from the statistics on PostgreSQL, a lower bound on SQLite.
        assert _titles(page) == [_title(number) for number in range(129, 109, -1)]
        estimate = "≈ 130 articles" if on_postgres else "50+ articles"
        assert estimate in page.locator(".paginator").inner_text()
        _screenshot(page, tmp_path, "changelist")

        # "Next" to the end: every page adds new rows, the last one has rows and knows the
        # exact count.
        pages, last = _walk(page)
        assert [len(titles) for titles in pages] == [PER_PAGE] * 6 + [10]
        assert sorted(title for titles in pages for title in titles) == _titles_of(range(130))
        assert "130 articles" in last and "≈" not in last and "+" not in last

        # A filter from the sidebar, paged to its end.
        page.locator("#changelist-filter a").filter(has_text=re.compile(r"^\s*Ada\s*$")).click()
        page.wait_for_url(re.compile(ada))
        pages, last = _walk(page)
        assert [len(titles) for titles in pages] == [PER_PAGE] * 3 + [10]
        assert sorted(title for titles in pages for title in titles) == _titles_of(AUTHORS["Ada"])
        assert "70 articles" in last

        # A search from that last page (the form carries the filter along, and the stale
        # cursor as a hidden field): the results start again at their first page.
        page.fill("#searchbar", "replicas")
        page.press("#searchbar", "Enter")
        page.wait_for_url(re.compile(r"[?&]q=replicas"))
        assert ada in page.url
        assert _titles(page) == [_title(number) for number in range(68, 28, -2)]
        pages, last = _walk(page)
        assert [len(titles) for titles in pages] == [PER_PAGE, 15]
        assert sorted(title for titles in pages for title in titles) == _titles_of(
            [number for number in AUTHORS["Ada"] if number % 2 == 0]
        )
        assert "35 articles" in last
        _screenshot(page, tmp_path, "searched-last-page")
        last_url = page.url

        paused = False
        try:
            if replica is not None:
                # With replay paused, an article committed on the primary is missing on the
                # standby: a changelist without it was read from the standby.
                def pause_and_write() -> None:
                    _catch_up(replica)  # the login's writes, so no read waits for them
                    pause_replay("replica")
                    Article.objects.create(author=authors["Hedy"], title="Unreplicated article")

                _in_own_thread(pause_and_write)
                paused = True
                page.goto(f"{CHANGELIST}?q=Unreplicated")
                assert "0 articles" in page.locator(".paginator").inner_text()
                assert page.locator("#result_list").count() == 0
                page.goto(last_url)

            # Open the first article of the last page, edit its title and save.
            link = page.locator("#result_list tbody th.field-title a").first
            original = link.inner_text()
            link.click()
            page.wait_for_url(re.compile(r"/admin/testapp/article/\d+/change/"))
            match = re.search(r"/article/(\d+)/change/", page.url)
            assert match
            title = page.locator("#id_title")
            assert title.input_value() == original
            title.fill(original + EDITED)
            page.click("input[name=_save]")
            page.wait_for_url(re.compile(rf"{re.escape(CHANGELIST)}\?"))

            # The success message, and the changelist, with the filter and search kept,
            # showing the new title: read-your-writes (from the primary, as the standby is
            # paused, on PostgreSQL).
            message = page.locator(".messagelist .success").inner_text()
            assert "was changed successfully" in message and original + EDITED in message
            assert original + EDITED in _titles(page)
            assert ada in page.url and "q=replicas" in page.url
            _screenshot(page, tmp_path, "after-save")
        finally:
            if paused:
                _in_own_thread(lambda: (resume_replay("replica"), replica.wait_for_replay()))

    saved = Article.objects.using("default").get(pk=int(match.group(1)))
    assert (saved.title, saved.author_id) == (original + EDITED, authors["Ada"].pk)
