"""ScaleModelAdmin is drop-in: where docs/admin.md names no difference, it behaves as Django's.

Each test is the regression test of an item of issue 20 ("ScaleModelAdmin", items 1-8).
"""

from __future__ import annotations

import datetime
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.contrib import admin as django_admin
from django.contrib.admin.filters import DateFieldListFilter, FieldListFilter
from django.contrib.admin.utils import get_fields_from_path
from django.contrib.auth.models import User
from django.db import connections
from django.template.response import TemplateResponse
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from otherapp.models import Desk, Event

from django_scale.admin import ScaleAllValuesFieldListFilter, ScaleModelAdmin, ScaleRelatedFieldListFilter
from django_scale.timeouts import current_statement_timeout

from testapp.admin import SmallThresholdPaginator
from testapp.models import Article, Author, BulkRecord, Post


@pytest.fixture
def chief(db) -> User:
    return User.objects.create_superuser("chief", "chief@example.com", "pw")


@pytest.fixture
def client(chief) -> Client:
    client = Client()
    client.force_login(chief)
    return client


def _admin_for(model, site=None, base=ScaleModelAdmin, **options):
    return type(f"Probe{model.__name__}Admin", (base,), options)(model, site or django_admin.site)


def _request(chief: User, query: str = "", method: str = "get", data: Any = None) -> Any:
    factory = RequestFactory()
    request = (
        factory.post(f"/admin/{query}", data or {}) if method == "post" else factory.get(f"/admin/{query}")
    )
    request.user = chief
    return request


@contextmanager
def _changelist(model_admin, chief: User, query: str = "") -> Iterator[tuple[Any, CaptureQueriesContext]]:
    with CaptureQueriesContext(connections["default"]) as queries:
        yield model_admin.get_changelist_instance(_request(chief, query)), queries


def _labels(model_admin, chief: User, query: str = "") -> list[str]:
    """The choices of the changelist's first filter, as the page lists them."""
    with _changelist(model_admin, chief, query) as (changelist, _):
        return [choice["display"] for choice in changelist.filter_specs[0].choices(changelist)]


# -- 1. A bad related-filter value is Django's ?e=1 redirect ---------------------------------


@pytest.mark.parametrize("value", ["abc", "1,2"])
def test_a_bad_related_filter_value_redirects_to_the_error_flag(client, value):
    Article.objects.create(author=Author.objects.create(name="Ann"), title="a title")
    response = client.get(f"/admin/testapp/article/?author__id__exact={value}")
    assert response.status_code == 302
    assert response["Location"] == "/admin/testapp/article/?e=1"


# -- 2. Related-filter choices keep the related model's ordering -----------------------------


def test_related_filter_choices_keep_the_related_models_meta_ordering(chief):
    for name in ["carol", "alice", "bob"]:
        Desk.objects.create(name=name)
    stock = _labels(_admin_for(Event, base=django_admin.ModelAdmin, list_filter=["desk"]), chief)
    assert stock == ["All", "alice", "bob", "carol"]
    assert _labels(_admin_for(Event, list_filter=["desk"]), chief) == stock


def test_related_filter_choices_follow_the_related_admins_ordering_when_it_has_one(chief):
    for name in ["carol", "alice", "bob"]:
        Desk.objects.create(name=name)
    site = django_admin.AdminSite(name="probe")
    site.register(Desk, type("DeskAdmin", (django_admin.ModelAdmin,), {"ordering": ["-name"]}))
    stock = _labels(_admin_for(Event, site, base=django_admin.ModelAdmin, list_filter=["desk"]), chief)
    assert stock == ["All", "carol", "bob", "alice"]
    assert _labels(_admin_for(Event, site, list_filter=["desk"]), chief) == stock


# -- 3. get_list_filter() is what the admin wrote; the classes are chosen in the changelist ---


def test_get_list_filter_returns_what_the_admin_wrote(chief):
    written = ["author", "title", ("published", DateFieldListFilter)]
    model_admin = _admin_for(Article, list_filter=written)
    assert model_admin.get_list_filter(_request(chief)) == written
    with _changelist(model_admin, chief) as (changelist, _):
        assert changelist.list_filter == written


def test_overrides_that_edit_or_skip_super_still_get_the_scaled_filters(chief):
    Author.objects.bulk_create([Author(name="Ann"), Author(name="Bob")])

    class Edits(ScaleModelAdmin):
        list_filter = ["author", "title", "published"]

        def get_list_filter(self, request):
            filters = list(super().get_list_filter(request))
            filters.remove("published")
            return filters

    class Skips(ScaleModelAdmin):
        def get_list_filter(self, request):
            return ["author", "title"]

    for admin_class in (Edits, Skips):
        with _changelist(admin_class(Article, django_admin.site), chief) as (changelist, _):
            kinds = [type(spec) for spec in changelist.filter_specs]
        assert kinds == [ScaleRelatedFieldListFilter, ScaleAllValuesFieldListFilter], admin_class


def test_create_filter_picks_the_class_django_picks(chief):
    # Pins FieldListFilter._field_list_filters, the registry create_filter() walks.
    from django_scale.admin.filters import SCALED_FILTERS, create_filter

    request = _request(chief)
    cases = [
        (Article, "author"),  # a foreign key
        (Article, "title"),  # a plain field
        (Article, "published"),  # a date
        (Article, "author__name"),  # a plain field through a relation
        (BulkRecord, "flag"),  # a boolean
        (Post, "tags"),  # a many-to-many
        (Author, "articles"),  # a reverse relation
    ]
    for model, path in cases:
        field = get_fields_from_path(model, path)[-1]
        stock_admin = django_admin.ModelAdmin(model, django_admin.site)
        django = FieldListFilter.create(field, request, {}, model, stock_admin, field_path=path)
        ours = create_filter(field, request, {}, model, _admin_for(model), path)
        assert type(ours) is SCALED_FILTERS.get(type(django), type(django)), path


# -- 4. show_full_result_count = True is honoured -------------------------------------------


def test_show_full_result_count_set_by_the_admin_gives_the_exact_total(chief):
    Author.objects.bulk_create(Author(name=f"writer {i}") for i in range(120))
    Author.objects.bulk_create(Author(name=f"zebra {i}") for i in range(3))
    model_admin = _admin_for(
        Author, show_full_result_count=True, search_fields=["name"], paginator=SmallThresholdPaginator
    )
    with _changelist(model_admin, chief, "?q=zebra") as (changelist, _):
        assert (changelist.show_full_result_count, changelist.full_result_count) == (True, 123)
        assert changelist.result_count == 3
    with _changelist(_admin_for(Author, search_fields=["name"]), chief, "?q=zebra") as (changelist, queries):
        assert (changelist.show_full_result_count, changelist.full_result_count) == (False, None)
    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]


# -- 5. Keyset next links: UUID keys, USE_TZ timestamps, ties -------------------------------


@pytest.mark.urls("otherapp.admin_site")
@pytest.mark.parametrize("ordering", [["-at"], ["-title"], ["at", "-title"], ["title"]])
def test_next_links_reach_every_event_once(client, monkeypatch, ordering):
    from otherapp.admin_site import EventAdmin

    monkeypatch.setattr(EventAdmin, "ordering", ordering)
    desk = Desk.objects.create(name="news")
    shared = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.timezone.utc)
    # 17 events share one timestamp, and titles repeat: only the UUID breaks the ties.
    events = [
        Event(
            desk=desk,
            title=f"event {i % 4}",
            at=shared if i < 17 else shared + datetime.timedelta(hours=i),
        )
        for i in range(23)
    ]
    Event.objects.bulk_create(events)
    seen: list[str] = []
    url, by_cursor = "/dropin/otherapp/event/", 0
    while url:
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        seen += re.findall(r'href="/dropin/otherapp/event/([0-9a-f-]{36})/change/', html)
        following = re.search(r'href="(\?[^"]*_after=[^"]*)"', html)
        url = "/dropin/otherapp/event/" + following.group(1).replace("&amp;", "&") if following else ""
        by_cursor += bool(following)
    assert by_cursor == 4  # 23 rows, 5 a page: four pages reached through "next"
    assert sorted(seen) == sorted(str(event.pk) for event in events)


# -- 6. changelist_view returns an unrendered TemplateResponse ------------------------------


def test_changes_after_super_changelist_view_apply_and_rendering_runs_under_the_guard(chief):
    Author.objects.create(name="Ann")
    seen: list[float | None] = []

    def probe(obj):
        seen.append(current_statement_timeout(Author.objects.db))
        return "probed"

    class Custom(ScaleModelAdmin):
        list_display = ["name", probe]
        statement_timeout = 4.5
        date_hierarchy = None

        def changelist_view(self, request, extra_context=None):
            response = super().changelist_view(request, extra_context)
            response.context_data["title"] = "Changed after super"
            return response

    response = Custom(Author, django_admin.site).changelist_view(_request(chief))
    assert isinstance(response, TemplateResponse) and not response.is_rendered
    assert response.template_name == [
        "admin/testapp/author/change_list.html",
        "admin/testapp/change_list.html",
        "admin/change_list.html",
    ]
    assert seen == []
    response.render()
    html = response.content.decode()
    assert "Changed after super" in html and "probed" in html
    assert seen == [4.5]
    assert current_statement_timeout(Author.objects.db) is None
    # A rendered response pickles (a cache stores it) like Django's own.
    assert "Changed after super" in pickle.loads(pickle.dumps(response)).content.decode()


def test_a_date_hierarchy_changelist_keeps_djangos_template_name(chief):
    Article.objects.create(
        author=Author.objects.create(name="Ann"),
        title="t",
        published=datetime.datetime.now(datetime.timezone.utc),
    )
    model_admin = _admin_for(Article, date_hierarchy="published")
    response = model_admin.changelist_view(_request(chief))
    assert response.template_name[-1] == "admin/change_list.html"
    with CaptureQueriesContext(connections["default"]) as queries:
        html = response.render().content.decode()
    assert 'class="toplinks"' in html
    # Rendered by {% scale_date_hierarchy %}: no DISTINCT over the rows, as Django's tag runs.
    assert not [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]


# -- 7. The form and delete views check CSRF when called directly ---------------------------


@pytest.mark.parametrize("view", ["changeform_view", "delete_view"])
def test_change_and_delete_views_check_csrf_when_called_directly(chief, view):
    article = Article.objects.create(author=Author.objects.create(name="Ann"), title="kept")
    request = _request(
        chief, method="post", data={"title": "changed", "author": article.author_id, "post": "yes"}
    )
    response = getattr(_admin_for(Article), view)(request, str(article.pk))
    assert response.status_code == 403
    assert Article.objects.filter(pk=article.pk, title="kept").exists()


# -- 8. Filter choices are not queried when the page does not show them ---------------------


def test_a_post_does_not_query_filter_choices(client):
    authors = Author.objects.bulk_create([Author(name="Ann"), Author(name="Bob")])
    Article.objects.create(author=authors[0], title="a title")
    with CaptureQueriesContext(connections["default"]) as queries:
        # An action with no row selected: Django answers with a redirect back.
        response = client.post("/admin/testapp/article/", {"action": "delete_selected", "index": 0})
    assert response.status_code == 302
    assert not [q["sql"] for q in queries.captured_queries if 'FROM "testapp_author"' in q["sql"]]
    # The GET that follows lists them.
    page = client.get("/admin/testapp/article/").content.decode()
    assert "?author__id__exact=" in page


@pytest.mark.parametrize("view", ["changeform_view", "delete_view", "history_view"])
def test_the_other_get_views_return_unrendered_responses_too(chief, view):
    article = Article.objects.create(author=Author.objects.create(name="Ann"), title="shown")
    response = getattr(_admin_for(Article), view)(_request(chief), str(article.pk))
    assert isinstance(response, TemplateResponse) and not response.is_rendered
    response.context_data["title"] = "Changed after super"
    assert "Changed after super" in response.render().content.decode()


# -- Found by Django's own admin suites (tests/compat) ---------------------------------------


def test_filter_choices_compare_as_the_list_django_holds(chief):
    Author.objects.bulk_create([Author(name="Bob"), Author(name="Ann")])
    with _changelist(_admin_for(Article, list_filter=["author"], ordering=None), chief) as (changelist, _):
        [spec] = changelist.filter_specs
    expected = [(author.pk, author.name) for author in Author.objects.order_by("pk")]
    assert spec.lookup_choices == expected


def test_get_queryset_may_return_a_manager(chief):
    # Django's ChangeList accepts a manager (admin_views' AdminCustomQuerysetTest).
    Author.objects.create(name="Ann")
    model_admin = _admin_for(Author, get_queryset=lambda self, request: Author.objects, list_filter=["name"])
    with _changelist(model_admin, chief) as (changelist, _):
        assert [author.name for author in changelist.result_list] == ["Ann"]
