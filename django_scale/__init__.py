"""django-scale: the scaling practices of the largest Django sites, as drop-in parts."""

from __future__ import annotations

__version__ = "0.1.0.dev0"
