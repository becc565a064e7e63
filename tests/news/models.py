"""The docs' news site, as small as the examples allow (see ``docs/*.md``, ``% example:``)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from django_scale.prefetch import PrefetchAwareForeignKey
from django_scale.querysets import ScaleQuerySet


class Section(models.Model):
    name = models.CharField(max_length=100)

    objects = ScaleQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name


class Author(models.Model):
    name = models.CharField(max_length=100)

    objects = ScaleQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    slug = models.SlugField(max_length=60, unique=True)
    name = models.CharField(max_length=60)

    objects = ScaleQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name


class Article(models.Model):
    # Nullable, so that the routing page's ``Article.objects.create(title="Breaking")`` runs.
    section = PrefetchAwareForeignKey(Section, models.PROTECT, null=True, blank=True, related_name="articles")
    author = PrefetchAwareForeignKey(Author, models.PROTECT, null=True, blank=True, related_name="articles")
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)
    status = models.CharField(max_length=10, default="draft")
    published_at = models.DateTimeField(default=timezone.now)
    views = models.PositiveIntegerField(default=0)
    word_count = models.IntegerField(null=True, blank=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="articles")

    objects = ScaleQuerySet.as_manager()

    def __str__(self) -> str:
        return self.title


class Comment(models.Model):
    article = PrefetchAwareForeignKey(Article, models.CASCADE, related_name="comments")
    author_name = models.CharField(max_length=100)
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    objects = ScaleQuerySet.as_manager()

    def __str__(self) -> str:
        return self.body
