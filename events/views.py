"""Thin async views: GET /api/events/stream (events/delivery/endpoint.py), POST /api/events/tickets,
POST /api/events/streams/<id>/token, and the JavaScript client."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from events.core.sse import iso_from_ms
from events.delivery import endpoint, renewal
from events.delivery.auth import AuthError, AuthUnavailable, Credentials, Identity, authenticate, issue_ticket
from events.delivery.hub import get_hub
from events.ops import metrics

# The browser client (docs: README "Connecting a front end"); also a static file, events-gateway/client.js.
CLIENT_DIR = Path(__file__).resolve().parent / "static" / "events-gateway"
CLIENT_FILES = {
    "client.js": "text/javascript; charset=utf-8",
    "client.d.ts": "application/typescript; charset=utf-8",
}
# Pages may reuse the client this long before asking again (an ETag makes asking cheap); it changes
# only with a release of the gateway.
CLIENT_MAX_AGE_SECONDS = 300


def error(status: int, message: str) -> JsonResponse:
    metrics.STREAMS_REFUSED.labels(str(status)).inc()
    return JsonResponse({"error": message}, status=status)


def _refuse(status: int, message: str, **extra: str) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


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


@csrf_exempt  # a bearer header, which no cross-site request carries by itself, is the only credential
async def stream_token(request: HttpRequest, stream_id: str) -> HttpResponseBase:
    """A fresh bearer token for an open stream of the same user: the stream's end moves to its `exp`."""
    if request.method != "POST":
        return _refuse(405, "use POST")
    if not renewal.STREAM_ID.match(stream_id):
        return _refuse(400, "not a stream id (the `stream` of a token-expiring event)")
    credentials = Credentials(
        query_keys=frozenset(request.GET),
        authorization=request.headers.get("Authorization", ""),
        ticket=None,
        session_key=None,  # a stream's end is a token's exp: only a token moves it
    )
    try:
        hub = await get_hub()
        identity = await authenticate(credentials, allow_ticket=False, redis=hub.redis)
        if identity is None or identity.expires_at is None:
            return _refuse(401, "a fresh token is required: Authorization: Bearer")
        result = await renewal.renew(
            hub.redis, user=identity.username, stream_id=stream_id, expires_at=identity.expires_at
        )
    except AuthError as exc:
        return _refuse(401, str(exc))
    except (aioredis.RedisError, OSError, AuthUnavailable, DatabaseError):
        return _refuse(503, "temporarily unavailable, try again")
    if result.outcome is renewal.Outcome.UNKNOWN:
        return _refuse(404, "no open stream of yours has this id")
    if result.outcome is renewal.Outcome.NO_END or result.expires_at is None:
        return _refuse(409, "this stream was not opened with a token: it has none to renew")
    expires = iso_from_ms(int(result.expires_at * 1000))
    if result.outcome is renewal.Outcome.NOT_LATER:
        return _refuse(409, "this token expires no later than the stream already does", expiresAt=expires)
    return JsonResponse({"stream": stream_id, "expiresAt": expires})


@functools.cache
def _client_file(name: str) -> tuple[bytes, str]:
    body = (CLIENT_DIR / name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


async def client_file(request: HttpRequest, name: str) -> HttpResponseBase:
    """The browser client and its types, under the API path so the API's CORS rules let pages on
    CORS_ALLOWED_ORIGINS import it."""
    if request.method not in ("GET", "HEAD"):
        return _refuse(405, "use GET")
    body, etag = await sync_to_async(_client_file, thread_sensitive=False)(name)
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponse(status=304)
    else:
        response = HttpResponse(body, content_type=CLIENT_FILES[name])
    response["ETag"] = etag
    response["Cache-Control"] = f"public, max-age={CLIENT_MAX_AGE_SECONDS}"
    if name == "client.js":
        response["X-TypeScript-Types"] = "./client.d.ts"  # Deno and some editors fetch the types from here
    return response
