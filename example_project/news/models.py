"""The newsroom's content: sections, authors, tags, articles and reader comments."""

from __future__ import annotations

from django.db import models
from django.urls import reverse
from django.utils import timezone

from django_scale.indexes import TrigramIndex
from django_scale.prefetch import PrefetchAwareForeignKey
from django_scale.querysets import ScaleQuerySet


class Section(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=100, unique=True)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        # Its default ordering (django_scale.W404).
        indexes = [models.Index(fields=["name"], name="news_section_name")]

    def __str__(self) -> str:
        return self.name


class Author(models.Model):
    name = models.CharField(max_length=200)
    email = models.EmailField(blank=True)
    bio = models.TextField(blank=True)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        # The admin searches authors by name: a trigram index serves "icontains".
        indexes = [
            TrigramIndex(fields=["name"], name="news_author_name_trgm"),
            # Its default ordering (django_scale.W404).
            models.Index(fields=["name"], name="news_author_name"),
        ]

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    name = models.CharField(max_length=60, unique=True)
    slug = models.SlugField(max_length=60, unique=True)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ArticleQuerySet(ScaleQuerySet):
    """Article queries: ``approx_count()`` (exact when small, else an estimate), and relations
    (author, tags, comments) loaded for a whole page of articles at once."""

    def published(self) -> ArticleQuerySet:
        """Return the articles readers may see: published, newest first."""
        return self.filter(status=Article.Status.PUBLISHED, published_at__lte=timezone.now())


class Article(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        PUBLISHED = "published", "Published"

    # No index of its own: news_article_section_latest starts with it (django_scale.W407).
    section = PrefetchAwareForeignKey(
        Section, on_delete=models.PROTECT, related_name="articles", db_index=False
    )
    author = PrefetchAwareForeignKey(Author, on_delete=models.PROTECT, related_name="articles")
    title = models.CharField(max_length=200)
    slug = models.SlugField(max_length=200, unique=True)
    body = models.TextField()
    published_at = models.DateTimeField(default=timezone.now, db_index=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT)
    tags = models.ManyToManyField(Tag, blank=True, related_name="articles")
    views = models.PositiveIntegerField(default=0)

    objects = ArticleQuerySet.as_manager()

    class Meta:
        ordering = ["-published_at"]
        indexes = [
            # The front page: the latest articles of one section.
            models.Index(fields=["section", "-published_at"], name="news_article_section_latest"),
            # The admin's status filter, in the changelist's order (django_scale.W306).
            models.Index(fields=["status", "-published_at"], name="news_article_status_latest"),
            # The admin's search by title, a substring: a trigram index of UPPER(title).
            TrigramIndex(fields=["title"], name="news_article_title_trgm"),
        ]

    def __str__(self) -> str:
        return self.title

    def get_absolute_url(self) -> str:
        return reverse("article-detail", args=[self.slug])


class Comment(models.Model):
    # No index of its own: news_comment_article_created starts with it (django_scale.W407).
    article = PrefetchAwareForeignKey(
        Article, on_delete=models.CASCADE, related_name="comments", db_index=False
    )
    author_name = models.CharField(max_length=100)
    body = models.TextField()
    # A default rather than auto_now_add, so the demo's bulk_create can backdate comments.
    created_at = models.DateTimeField(default=timezone.now)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["article", "created_at"], name="news_comment_article_created"),
            # The default ordering, the admin's date filter (django_scale.W404, W306).
            models.Index(fields=["created_at"], name="news_comment_created_at"),
            TrigramIndex(fields=["author_name"], name="news_comment_author_trgm"),
        ]

    def __str__(self) -> str:
        return f"{self.author_name} on article {self.article_id}"
