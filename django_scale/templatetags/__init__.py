"""Template tags of django-scale: ``{% load scale %}``."""
