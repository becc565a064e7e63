"""The app the docs' examples are written against: ``from news.models import Article`` works here.

Its models are the docs' news site (sections, authors, tags, articles, comments), cut to the
fields the examples use; ``tests/test_docs_examples.py`` runs each page's marked example on them.
"""
