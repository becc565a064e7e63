from __future__ import annotations

from django_scale.middleware import ScaleMiddleware


class ProjectScaleMiddleware(ScaleMiddleware):
    """A project's own subclass, which the checks must recognise."""
