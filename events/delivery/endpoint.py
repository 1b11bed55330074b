"""GET /api/events/stream, a Django async view (events/views.py) that runs without a thread of its own.

Django's ASGI handler runs each request in a thread-sensitive context, and its first sync call (the
request_started signal's receivers, each middleware) gives that context a dedicated thread for as long
as the request lives. A stream lives for hours: with 10,000 idle streams behind a plain Django view that
was 10,000 idle threads, 263 KB per stream and 228 s to connect them (bench/README.md). Views marked
`threadless` are served by the project's handler (gateway_project/asgi.py) in the event loop alone: no
thread-sensitive context, no middleware, no sync signal receivers. This module does what the middleware
would have (host check, CORS) and the rest (authentication, authorisation, refusals as JSON), with its
database work on the shared executor, and answers with the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl

import redis.asyncio as aioredis
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.http.cookie import parse_cookie
from django.http.request import split_domain_port, validate_host

from events.core import sse
from events.core.audit import audit_text
from events.core.envelope import PROCESS_INSTANCE
from events.delivery import cors
from events.delivery.auth import AuthError, AuthUnavailable, Credentials, authenticate, database_call
from events.delivery.hub import get_hub
from events.delivery.stream import Stream
from events.ops import metrics
from subscriptions.selectors import grants_missing

_grants_missing = database_call(grants_missing)

logger = logging.getLogger(__name__)

PATH = "/api/events/stream"
MAX_PROCESS_INSTANCES = 20
# Where the project's ASGI handler puts the server adapter's socket probe for a threadless view.
PROBE_SCOPE_KEY = "events_gateway.socket_probe"
# Streams opening at once in this process; more wait their turn. Opening holds a connection of the hub's
# Redis pool (redis-py's, 100 connections, refuses rather than waits when all are taken) for the slot claim
# and the replay: 1,000 streams reconnecting together after a web process died took them all, and most
# were told to retry. Half the pool leaves the rest to the hub's reader, ticker and audit writer.
OPENING_AT_ONCE = 50
_opening: asyncio.Semaphore | None = None
Send = Callable[[dict[str, Any]], Awaitable[None]]
View = TypeVar("View", bound=Callable[..., Coroutine[Any, Any, HttpResponseBase]])


class SocketProbe(Protocol):
    """What the server adapter can tell a stream about its connection (events/delivery/daphne.py)."""

    def buffered(self) -> int | None: ...

    def abort(self) -> None: ...

    def send_now(self, chunk: bytes) -> bool:
        """Write a piece of the response body straight to the socket if nothing is waiting before it; False
        if the caller must send it the ASGI way instead."""
        ...


ProbeFor = Callable[[Send], SocketProbe | None]


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _RetryLater(Exception):
    """A transient server fault (Redis or the database down): the stream opens, says retry, and closes."""


# Parameters that may appear once; a repeat is refused rather than guessed at.
SINGLE_PARAMETERS = ("lastEventId", "ticket", "since")
# Stream ids are under 1 KB (one position per store shard); anything longer was not issued here.
MAX_ID_LENGTH = 1024
# Clocks differ a little: a `since` up to this far ahead is taken as now.
SINCE_FUTURE_MS = 60_000
# Headers that may appear once (Cookie may be split in several; they are joined as browsers mean them).
SINGLE_HEADERS = ("authorization", "last-event-id", "host")
MAX_PARAMETER_LENGTH = 1024
MAX_QUERY_LENGTH = 8192


class StreamRequest:
    """What the endpoint reads from an ASGI scope; `problem` says what is malformed (a 400), if anything."""

    def __init__(self, scope: Mapping[str, Any]) -> None:
        self.method: str = scope["method"]
        self.problem: str | None = None
        self.headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            if name in self.headers:
                if name == "cookie":
                    value = f"{self.headers[name]}; {value}"
                elif name in SINGLE_HEADERS:
                    self.problem = f"the {name} header appears more than once"
            self.headers[name] = value
        query = scope.get("query_string", b"")
        if len(query) > MAX_QUERY_LENGTH:
            self.problem = f"the query string is longer than {MAX_QUERY_LENGTH} bytes"
            query = b""
        self.query = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        for name in SINGLE_PARAMETERS:
            if sum(1 for k, _ in self.query if k == name) > 1:
                self.problem = f"the {name} parameter appears more than once"
        if any(len(v) > MAX_PARAMETER_LENGTH for _, v in self.query):
            self.problem = f"a parameter is longer than {MAX_PARAMETER_LENGTH} characters"
        peer = str((scope.get("client") or ("", 0))[0])
        self.client_address = client_address(peer, self.headers.get("x-forwarded-for", ""))

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)

    def credentials(self) -> Credentials:
        # Django's own parser: lenient with the other cookies of the site (a JSON value, a space), which the
        # standard library's strict parser gives up on, losing the session cookie with them.
        session = parse_cookie(self.headers.get("cookie", "")).get(settings.SESSION_COOKIE_NAME)
        return Credentials(
            query_keys=frozenset(k for k, _ in self.query),
            authorization=self.headers.get("authorization", ""),
            ticket=self.param("ticket"),
            session_key=session or None,
        )


@functools.lru_cache(maxsize=4)
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in trusted if entry.strip())


def _trusted(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded_for: str) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy (TRUSTED_PROXIES); then the
    right-most X-Forwarded-For entry that is not itself a trusted proxy. Nothing else a client sends counts."""
    networks = _networks(tuple(settings.TRUSTED_PROXIES))
    if not forwarded_for or not _trusted(peer, networks):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            return hop
    return hops[0] if hops else peer


def threadless(view: View) -> View:
    """Mark an async view to be served without a thread, middleware or sync signals (gateway_project/asgi.py):
    it checks hosts and CORS itself and must never block."""
    view.threadless = True  # type: ignore[attr-defined]
    return view


async def respond(request: HttpRequest) -> HttpResponseBase:
    """The answer to GET /api/events/stream: a refusal (JSON), a retry (transient fault), or the stream."""
    if not isinstance(request, ASGIRequest):
        raise TypeError("the event stream is served over ASGI only")
    stream_request = StreamRequest(request.scope)
    origin = stream_request.headers.get("origin")
    if cors.is_preflight(stream_request.method, PATH, "access-control-request-method" in stream_request.headers):
        return _response(204, b"", "text/plain", cors.preflight_headers(origin))
    cors_headers = cors.response_headers(origin)
    global _opening  # noqa: PLW0603 - one gate per process, made in its event loop
    if _opening is None:
        _opening = asyncio.Semaphore(OPENING_AT_ONCE)
    async with _opening:
        return await _respond_opening(stream_request, request.scope.get(PROBE_SCOPE_KEY), cors_headers)


async def _respond_opening(
    stream_request: StreamRequest, probe: SocketProbe | None, cors_headers: dict[str, str]
) -> HttpResponseBase:
    try:
        stream = await _open(stream_request, probe=probe)
    except Refused as refusal:
        metrics.STREAMS_REFUSED.labels(str(refusal.status)).inc()
        refused = json.dumps({"error": str(refusal)}).encode()
        return _response(refusal.status, refused, "application/json", cors_headers)
    except _RetryLater:
        return _ask_to_retry(cors_headers, "a backend (Redis, the database, the JWKS endpoint) is unavailable")
    # The stream is registered and its replay read before the 200 goes out: a client that has its response
    # headers is already receiving everything stored from its starting position on.
    body = stream.body()
    try:
        first = await anext(body)
    except (aioredis.RedisError, OSError):
        await body.aclose()
        return _ask_to_retry(cors_headers, "the event store is unavailable while the stream opens")
    except BaseException:
        await body.aclose()
        raise
    return StreamResponse(first, body, {**_SSE_HEADERS, **cors_headers})


_SSE_TYPE = "text/event-stream; charset=utf-8"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"}


async def _open(request: StreamRequest, *, probe: SocketProbe | None) -> Stream:
    """Check everything, in the contract's order of refusals, and make the Stream."""
    if request.method != "GET":
        raise Refused(405, "use GET")
    if request.problem is not None:
        raise Refused(400, request.problem)
    allowed = settings.ALLOWED_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    if not _host_allowed(request.headers.get("host", ""), tuple(allowed)):
        raise Refused(400, "host not allowed")
    process_instances = [v for k, v in request.query if k == "processInstanceUuid"]
    if len(process_instances) > MAX_PROCESS_INSTANCES:
        raise Refused(400, f"at most {MAX_PROCESS_INSTANCES} processInstanceUuid parameters")
    if any(not PROCESS_INSTANCE.match(p) for p in process_instances):
        raise Refused(400, "processInstanceUuid must match ^[A-Za-z0-9_.:-]{1,128}$")
    process_instances = list(dict.fromkeys(process_instances))
    last_event_id = (request.headers.get("last-event-id") or request.param("lastEventId") or "").strip() or None
    if last_event_id is not None and len(last_event_id) > MAX_ID_LENGTH:
        raise Refused(400, "Last-Event-ID is too long to be an id this gateway issued")
    since_ms = _since(request.param("since"))
    if since_ms is not None and last_event_id is not None:
        raise Refused(400, "give either Last-Event-ID or since, not both")

    try:
        hub = await get_hub()
        identity = await authenticate(request.credentials(), allow_ticket=True, redis=hub.redis)
        if identity is None:
            raise Refused(401, "authentication required: session cookie, Authorization: Bearer, or ?ticket=")
        missing = []
        if process_instances and not identity.view_all:
            missing = await _grants_missing(user=identity.username, process_instances=process_instances)
    except AuthError as exc:
        raise Refused(401, str(exc)) from exc
    except (aioredis.RedisError, OSError, AuthUnavailable, DatabaseError) as exc:
        raise _RetryLater from exc
    if missing:
        raise Refused(403, f"not allowed to follow process instance {missing[0]}")

    stream_id = str(uuid.uuid4())
    try:
        if not await hub.claim_slot(identity.username, stream_id, identity.expires_at):
            raise Refused(429, f"at most {settings.EVENTS_MAX_STREAMS_PER_USER} open streams per user")
    except (aioredis.RedisError, OSError) as exc:
        raise _RetryLater from exc
    return Stream(
        hub=hub,
        stream_id=stream_id,
        user=identity.username,
        followed=process_instances,
        auth_method=identity.method,
        last_event_id=last_event_id,
        expires_at=identity.expires_at,
        client_address=audit_text(request.client_address, 64),
        user_agent=audit_text(request.headers.get("user-agent", ""), 512),
        write_buffer=probe.buffered if probe else None,
        abort=probe.abort if probe else None,
        send_now=probe.send_now if probe else None,
        since_ms=since_ms,
    )


@functools.lru_cache(maxsize=256)
def _host_allowed(host_header: str, allowed: tuple[str, ...]) -> bool:
    """Django's host check (cached: every stream of a deployment names the same few hosts)."""
    host, _ = split_domain_port(host_header)
    return bool(host) and validate_host(host, allowed)


def _since(value: str | None) -> int | None:
    """`since` as epoch milliseconds: digits (epoch ms) or an ISO 8601 time with a zone (Z or an offset)."""
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"[0-9]{1,15}", text):
        ms = int(text)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise Refused(400, "since must be epoch milliseconds or an ISO 8601 time") from None
        if moment.tzinfo is None:
            raise Refused(400, "since needs a time zone (for example 2026-11-30T10:00:00Z)")
        ms = int(moment.timestamp() * 1000)
    if ms > time.time() * 1000 + SINCE_FUTURE_MS:
        raise Refused(400, "since is in the future")
    return max(ms, 0)


class StreamResponse(StreamingHttpResponse):
    """An open stream's response: its first chunk (`first`), then the stream's body (`body`). Any ASGI handler
    can send it as a streaming response; the project's handler sends `first` and `body` itself, keeping
    nothing else for the stream's life, and closes `body` once done, whether or not it was sent."""

    def __init__(self, first: bytes, body: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        self.first = first
        self.body = body
        super().__init__(self._chunks(first, body), content_type=_SSE_TYPE, headers=headers)

    @staticmethod
    async def _chunks(first: bytes, body: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(body):
            yield first
            async for chunk in body:
                yield chunk


def _ask_to_retry(cors: dict[str, str], why: str) -> HttpResponse:
    """A transient fault: not a 5xx, which would stop EventSource for good, but a stream that says `retry:`
    and ends."""
    logger.warning("%s; asking the client to retry", why, exc_info=True)
    body = sse.retry(settings.EVENTS_RETRY_MS) + b": temporarily unavailable\n\n"
    return _response(200, body, _SSE_TYPE, {**cors, **_SSE_HEADERS})


def _response(status: int, body: bytes, content_type: str, headers: dict[str, str]) -> HttpResponse:
    return HttpResponse(
        body, status=status, content_type=content_type, headers={"Content-Length": str(len(body)), **headers}
    )
