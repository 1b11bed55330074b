"""Thin async views: parse, authenticate, authorise, then hand over to a Stream."""

from __future__ import annotations

import logging
import uuid

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from events import metrics, sse
from events.auth import AuthError, Identity, authenticate, issue_ticket
from events.envelope import PROCESS_INSTANCE
from events.hub import get_hub
from events.streams import Stream
from subscriptions.selectors import grants_missing

logger = logging.getLogger(__name__)

MAX_PROCESS_INSTANCES = 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error(status: int, message: str) -> JsonResponse:
    metrics.STREAMS_REFUSED.labels(str(status)).inc()
    return JsonResponse({"error": message}, status=status)


def _retry_later() -> StreamingHttpResponse:
    """A transient fault: open, say retry, close (a 5xx would make EventSource give up for good)."""

    async def body():  # type: ignore[no-untyped-def]
        yield sse.retry(settings.EVENTS_RETRY_MS) + b": temporarily unavailable\n\n"

    return StreamingHttpResponse(body(), content_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS)


async def stream(request: HttpRequest) -> HttpResponseBase:
    if request.method != "GET":
        return error(405, "use GET")
    process_instances = request.GET.getlist("processInstanceUuid")
    if len(process_instances) > MAX_PROCESS_INSTANCES:
        return error(400, f"at most {MAX_PROCESS_INSTANCES} processInstanceUuid parameters")
    bad = [p for p in process_instances if not PROCESS_INSTANCE.match(p)]
    if bad:
        return error(400, "processInstanceUuid must match ^[A-Za-z0-9_.:-]{1,128}$")
    process_instances = list(dict.fromkeys(process_instances))
    last_event_id = request.headers.get("Last-Event-ID") or request.GET.get("lastEventId") or None
    if last_event_id is not None and len(last_event_id) > 64:
        return error(400, "Last-Event-ID is too long to be an id this gateway issued")

    try:
        hub = await get_hub()
    except (aioredis.RedisError, OSError):
        logger.warning("event store unavailable; asking the client to retry", exc_info=True)
        return _retry_later()
    try:
        identity = await authenticate(request, allow_ticket=True, redis=hub.redis)
    except AuthError as exc:
        return error(401, str(exc))
    except (aioredis.RedisError, OSError):
        return _retry_later()
    if identity is None:
        return error(401, "authentication required: session cookie, Authorization: Bearer, or ?ticket=")
    if process_instances and not identity.view_all:
        missing = await sync_to_async(grants_missing)(user=identity.username, process_instances=process_instances)
        if missing:
            return error(403, f"not allowed to follow process instance {missing[0]}")

    stream_id = str(uuid.uuid4())
    try:
        if not await hub.claim_slot(identity.username, stream_id):
            return error(429, f"at most {settings.EVENTS_MAX_STREAMS_PER_USER} open streams per user")
    except (aioredis.RedisError, OSError):
        return _retry_later()
    transport = getattr(request, "scope", {}).get("events.transport")
    sse_stream = Stream(
        hub=hub,
        stream_id=stream_id,
        user=identity.username,
        followed=process_instances,
        auth_method=identity.method,
        last_event_id=last_event_id.strip() if last_event_id else None,
        expires_at=identity.expires_at,
        client_address=_client_address(request),
        user_agent=request.headers.get("User-Agent", ""),
        write_buffer=transport.buffered if transport else None,
        abort=transport.abort if transport else None,
    )
    return StreamingHttpResponse(
        sse_stream.body(), content_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS
    )


@csrf_exempt
async def tickets(request: HttpRequest) -> HttpResponseBase:
    if request.method != "POST":
        return error(405, "use POST")
    try:
        hub = await get_hub()
        identity: Identity | None = await authenticate(request, allow_ticket=False, redis=hub.redis)
    except AuthError as exc:
        return error(401, str(exc))
    except (aioredis.RedisError, OSError):
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


def _client_address(request: HttpRequest) -> str:
    forwarded = request.headers.get("X-Forwarded-For", "")
    return forwarded.split(",")[0].strip() if forwarded else request.META.get("REMOTE_ADDR", "") or ""
