"""ScaleModelAdmin: GET pages on a replica, POSTs on the primary."""

from __future__ import annotations

import datetime

import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.test import Client
from django.test.utils import CaptureQueriesContext

from django_scale.replicas import monitor, parse_lsn
from django_scale.testing import capture_reads

from testapp.models import Article, Author

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])
PUBLISHED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


@pytest.fixture
def admin_client(replica) -> Client:
    user = User.objects.create_superuser("boss", "boss@example.com", "pw")
    client = Client()
    client.force_login(user)
    replica.wait_for_replay()
    # The user and the session are on the replica, and this process's monitor knows it.
    assert monitor("replica").wait_for(parse_lsn(replica.primary_lsn()), 10)
    return client


@REPLICA
def test_changelist_and_change_form_read_from_the_replica(admin_client, paused_replica):
    author = Author.objects.create(name="Ursula")
    # Committed on the primary while replay is paused: the replica does not have it.
    with capture_reads() as reads:
        response = admin_client.get("/admin/testapp/author/")
    assert response.status_code == 200
    assert "Ursula" not in response.content.decode()
    assert set(reads) == {"replica"}
    assert Author.objects.using("default").filter(pk=author.pk).exists()


@REPLICA
def test_a_post_loads_the_object_from_the_primary_and_keeps_newer_columns(admin_client, replica):
    author = Author.objects.create(name="Octavia")
    article = Article.objects.create(author=author, title="Draft")
    replica.wait_for_replay()
    assert monitor("replica").wait_for(parse_lsn(replica.primary_lsn()), 10)

    with capture_reads() as reads:
        page = admin_client.get(f"/admin/testapp/article/{article.pk}/change/")
    assert page.status_code == 200 and "Draft" in page.content.decode()
    assert set(reads) == {"replica"}

    replica.pause()
    try:
        # Newer values on the primary that the paused replica does not have.
        Article.objects.filter(pk=article.pk).update(published=PUBLISHED)
        with CaptureQueriesContext(connections["replica"]) as on_replica:
            response = admin_client.post(
                f"/admin/testapp/article/{article.pk}/change/", {"title": "Final", "author": author.pk}
            )
        assert response.status_code == 302, response.content.decode()[:2000]
        # Only the session and user lookups, before the view, ran on the replica; the article
        # (and the author the form validates) were read from the primary.
        replica_sql = " ".join(query["sql"] for query in on_replica.captured_queries)
        assert "testapp_article" not in replica_sql and "testapp_author" not in replica_sql
        saved = Article.objects.using("default").get(pk=article.pk)
        assert (saved.title, saved.published) == ("Final", PUBLISHED)

        # The redirect's page is the user's next request: it shows their own write.
        with capture_reads() as reads:
            listing = admin_client.get(response["Location"])
        assert "Final" in listing.content.decode()
        assert set(reads) == {"default"}
    finally:
        replica.resume()
