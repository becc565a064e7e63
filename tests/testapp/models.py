from __future__ import annotations

from django.db import models

from django_scale.indexes import TrigramIndex
from django_scale.querysets import ScaleQuerySet


class Author(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Article(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="articles")
    title = models.CharField(max_length=200)
    published = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [TrigramIndex(fields=["title"], name="testapp_article_title_trgm")]

    def __str__(self) -> str:
        return self.title


# -- Prefetch-aware models (django_scale.querysets, django_scale.prefetch) -------------------


class Reporter(models.Model):
    name = models.CharField(max_length=100)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Profile(models.Model):
    reporter = models.OneToOneField(Reporter, on_delete=models.CASCADE, related_name="profile")
    bio = models.CharField(max_length=200, blank=True)

    objects = ScaleQuerySet.as_manager()

    def __str__(self) -> str:
        return self.bio


class Tag(models.Model):
    name = models.CharField(max_length=60)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Post(models.Model):
    reporter = models.ForeignKey(Reporter, on_delete=models.CASCADE, related_name="posts")
    editor = models.ForeignKey(
        Reporter, on_delete=models.SET_NULL, null=True, blank=True, related_name="edited_posts"
    )
    title = models.CharField(max_length=200)
    tags = models.ManyToManyField(Tag, blank=True, related_name="posts")

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.title


class Reply(models.Model):
    post = models.ForeignKey(Post, on_delete=models.CASCADE, related_name="replies")
    body = models.CharField(max_length=200)
    approved = models.BooleanField(default=True)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.body
