"""CORS for the events API: credentials allowed for CORS_ALLOWED_ORIGINS only."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

API_PREFIX = "/api/events/"
ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-CSRFToken, Cache-Control"
# Browsers cache a passed preflight this long (Chromium caps it at 2 hours).
PREFLIGHT_MAX_AGE = "600"


class CorsMiddleware(MiddlewareMixin):
    def _allowed_origin(self, request: HttpRequest) -> str | None:
        origin = request.headers.get("Origin")
        if origin and request.path.startswith(API_PREFIX) and origin in settings.CORS_ALLOWED_ORIGINS:
            return origin
        return None

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        if (
            request.method == "OPTIONS"
            and request.path.startswith(API_PREFIX)
            and "Access-Control-Request-Method" in request.headers
        ):
            response = HttpResponse(status=204)
            origin = self._allowed_origin(request)
            if origin is not None:
                response["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
                response["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
            return response
        return None

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if request.path.startswith(API_PREFIX):
            response["Vary"] = "Origin"
            origin = self._allowed_origin(request)
            if origin is not None:
                response["Access-Control-Allow-Origin"] = origin
                response["Access-Control-Allow-Credentials"] = "true"
        return response
