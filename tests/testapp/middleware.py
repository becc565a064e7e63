from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import patch_vary_headers

from django_scale.middleware import ScaleMiddleware


class ProjectScaleMiddleware(ScaleMiddleware):
    """A project's own subclass, which the checks must recognise."""


class TenantMiddleware:
    """Pick the tenant from the X-Tenant header and vary on it, outside the view (as projects do)."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        request.tenant = request.headers.get("X-Tenant")  # type: ignore[attr-defined]
        response: HttpResponseBase = self.get_response(request)
        patch_vary_headers(response, ["X-Tenant"])
        return response


class BoomMiddleware:
    """Raise on the way out when the request carries X-Boom (a middleware failing after the view)."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase = self.get_response(request)
        if "X-Boom" in request.headers:
            raise RuntimeError("boom after the view")
        return response


class TrackingMiddleware:
    """Set a tracking cookie on responses to requests that carry X-Track (a cookie set on a hit)."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase = self.get_response(request)
        if "X-Track" in request.headers:
            response.set_cookie("tracked", request.headers["X-Track"])
        return response
