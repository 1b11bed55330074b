"""CORS for the events API: credentials allowed for CORS_ALLOWED_ORIGINS only.

The rules live in plain functions so the stream's view, which runs without middleware, applies the same ones.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

API_PREFIX = "/api/events/"
ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-CSRFToken, Cache-Control"
# Browsers cache a passed preflight this long (Chromium caps it at 2 hours).
PREFLIGHT_MAX_AGE = "600"


def allowed_origin(origin: str | None) -> str | None:
    return origin if origin and origin in settings.CORS_ALLOWED_ORIGINS else None


def response_headers(origin: str | None) -> dict[str, str]:
    """Headers for an API response to a request from `origin`."""
    headers = {"Vary": "Origin"}
    if allowed_origin(origin):
        headers.update({"Access-Control-Allow-Origin": str(origin), "Access-Control-Allow-Credentials": "true"})
    return headers


def preflight_headers(origin: str | None) -> dict[str, str]:
    """Headers for the 204 answer to a preflight; without the allow headers the browser refuses."""
    headers = response_headers(origin)
    if allowed_origin(origin):
        headers.update(
            {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            }
        )
    return headers


def is_preflight(method: str, path: str, has_request_method: bool) -> bool:
    return method == "OPTIONS" and path.startswith(API_PREFIX) and has_request_method


class CorsMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        if is_preflight(request.method or "", request.path, "Access-Control-Request-Method" in request.headers):
            response = HttpResponse(status=204)
            for key, value in preflight_headers(request.headers.get("Origin")).items():
                response[key] = value
            return response
        return None

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if request.path.startswith(API_PREFIX):
            for key, value in response_headers(request.headers.get("Origin")).items():
                response[key] = value
        return response
