from __future__ import annotations

from django.db import models

from django_scale.indexes import TrigramIndex


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
