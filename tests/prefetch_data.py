"""The posts, replies, tags and reporters the prefetch tests share, and their helpers."""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.models import QuerySet
from django.test.utils import CaptureQueriesContext

from testapp.models import Post, Profile, Reply, Reporter, Tag

POSTS = 12


def build(posts: int = POSTS) -> None:
    """Reporters (one without a profile), tags, posts with 0-3 tags and 0-3 replies."""
    reporters = Reporter.objects.bulk_create(Reporter(name=f"reporter {i}") for i in range(5))
    Profile.objects.bulk_create(
        Profile(reporter=reporter, bio=f"bio {i}") for i, reporter in enumerate(reporters[:4])
    )
    tags = Tag.objects.bulk_create(Tag(name=f"tag {i}") for i in range(4))
    created = Post.objects.bulk_create(
        Post(
            reporter=reporters[i % 5],
            editor=reporters[(i + 1) % 5] if i % 3 else None,
            title=f"post {i}",
        )
        for i in range(posts)
    )
    through = Post.tags.through
    through.objects.bulk_create(
        through(post_id=post.pk, tag_id=tags[(i + k) % 4].pk)
        for i, post in enumerate(created)
        for k in range(i % 4)
    )
    Reply.objects.bulk_create(
        Reply(post=post, body=f"reply {i}.{k}", approved=k % 2 == 0)
        for i, post in enumerate(created)
        for k in range(i % 4)
    )


def count(alias: str = "default") -> CaptureQueriesContext:
    return CaptureQueriesContext(connections[alias])


def stock(model: Any) -> QuerySet[Any]:
    """Django's plain queryset of *model*, for expected values."""
    return QuerySet(model)
