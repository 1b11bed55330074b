"""Thin async views: GET /api/events/stream (events/delivery/endpoint.py) and POST /api/events/tickets."""

from __future__ import annotations

import redis.asyncio as aioredis
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from events.delivery import endpoint
from events.delivery.auth import AuthError, AuthUnavailable, Credentials, Identity, authenticate, issue_ticket
from events.delivery.hub import get_hub
from events.ops import metrics


def error(status: int, message: str) -> JsonResponse:
    metrics.STREAMS_REFUSED.labels(str(status)).inc()
    return JsonResponse({"error": message}, status=status)


@endpoint.threadless
async def stream(request: HttpRequest) -> HttpResponseBase:
    """Served without a thread of its own, middleware or sync signals (gateway_project/asgi.py): it lives
    as long as the client stays, and does its own host, CORS and authentication checks."""
    return await endpoint.respond(request)


@csrf_exempt
async def tickets(request: HttpRequest) -> HttpResponseBase:
    if request.method != "POST":
        return error(405, "use POST")
    try:
        hub = await get_hub()
        credentials = Credentials(
            query_keys=frozenset(request.GET),
            authorization=request.headers.get("Authorization", ""),
            ticket=None,
            session_key=request.COOKIES.get(settings.SESSION_COOKIE_NAME),
        )
        identity: Identity | None = await authenticate(credentials, allow_ticket=False, redis=hub.redis)
    except AuthError as exc:
        return error(401, str(exc))
    except (aioredis.RedisError, OSError, AuthUnavailable, DatabaseError):
        return error(503, "temporarily unavailable, try again")
    if identity is None:
        return error(401, "authentication required: session cookie or Authorization: Bearer")
    if identity.method == "session":
        # A cookie rides along on cross-site requests; a bearer header cannot, so only sessions need CSRF.
        rejected = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(request, None, (), {})  # type: ignore[arg-type]
        if rejected is not None:
            return error(403, "CSRF check failed: send the csrftoken cookie's value as X-CSRFToken")
    try:
        ticket, lifetime = await issue_ticket(hub.redis, identity)
    except (aioredis.RedisError, OSError):
        return error(503, "temporarily unavailable, try again")
    return JsonResponse({"ticket": ticket, "expiresIn": lifetime}, status=201)
