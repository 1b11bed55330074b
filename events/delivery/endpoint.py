"""GET /api/events/stream, as a plain ASGI application in front of Django.

Django's ASGI handler runs each request in a thread-sensitive context of its own, and its first sync
call (the request_started signal's receivers) gives that context a dedicated thread for as long as the
request lives. A stream lives for hours: measured with 10,000 idle streams behind the Django view, that
was 10,000 idle threads, 263 KB per stream and 228 s to connect them (bench/README.md). This endpoint
does the same work (host check, CORS, authentication, authorisation, refusals as JSON), with its
database work on the shared executor, and then writes the stream straight to the server.
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
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl

import redis.asyncio as aioredis
from django.conf import settings
from django.db import DatabaseError
from django.http.cookie import parse_cookie
from django.http.request import split_domain_port, validate_host

from events.core import sse
from events.core.audit import audit_text
from events.core.envelope import PROCESS_INSTANCE
from events.core.records import CloseReason
from events.delivery import cors, renewal
from events.delivery.auth import AuthError, AuthUnavailable, Credentials, authenticate, database_call
from events.delivery.hub import get_hub
from events.delivery.stream import Stream
from events.ops import metrics
from subscriptions.selectors import grants_missing

_grants_missing = database_call(grants_missing)

logger = logging.getLogger(__name__)

PATH = "/api/events/stream"
MAX_PROCESS_INSTANCES = 20
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class SocketProbe(Protocol):
    """What the server adapter can tell a stream about its connection (events/delivery/daphne.py)."""

    def buffered(self) -> int | None: ...

    def abort(self) -> None: ...


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

    def __init__(self, scope: dict[str, Any]) -> None:
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


class StreamEndpoint:
    """The ASGI application for PATH; `probe_for` comes from the server adapter (None: no probe)."""

    def __init__(self, *, probe_for: ProbeFor | None = None) -> None:
        self.probe_for = probe_for

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        probe = self.probe_for(send) if self.probe_for is not None else None
        await stream_endpoint(scope, receive, send, probe=probe)


async def stream_endpoint(scope: dict[str, Any], receive: Receive, send: Send, *, probe: SocketProbe | None) -> None:
    request = StreamRequest(scope)
    origin = request.headers.get("origin")
    if cors.is_preflight(request.method, PATH, "access-control-request-method" in request.headers):
        await _respond(send, 204, b"", "text/plain", cors.preflight_headers(origin))
        return
    cors_headers = cors.response_headers(origin)
    try:
        stream = await _open(request, probe=probe)
    except Refused as refusal:
        metrics.STREAMS_REFUSED.labels(str(refusal.status)).inc()
        body = json.dumps({"error": str(refusal)}).encode()
        await _respond(send, refusal.status, body, "application/json", cors_headers)
        return
    except _RetryLater:
        await _ask_to_retry(send, cors_headers, "a backend (Redis, the database, the JWKS endpoint) is unavailable")
        return
    await _serve(stream, receive, send, cors_headers)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"}


async def _open(request: StreamRequest, *, probe: SocketProbe | None) -> Stream:
    """Check everything, in the contract's order of refusals, and make the Stream."""
    if request.method != "GET":
        raise Refused(405, "use GET")
    if request.problem is not None:
        raise Refused(400, request.problem)
    host, _ = split_domain_port(request.headers.get("host", ""))
    allowed = settings.ALLOWED_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    if not host or not validate_host(host, allowed):
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
        if identity.expires_at is not None:  # first: a renewal that finds the stream's slot finds its end too
            await renewal.record_expiry(hub.redis, stream_id, identity.expires_at)
        if not await hub.claim_slot(identity.username, stream_id):
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
        since_ms=since_ms,
    )


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


async def _serve(stream: Stream, receive: Receive, send: Send, cors: dict[str, str]) -> None:
    """The stream is registered and its replay read before the 200 goes out: a client that has its response
    headers is already receiving everything stored from its starting position on."""
    headers = {"Content-Type": "text/event-stream; charset=utf-8", **_SSE_HEADERS, **cors}
    async with contextlib.aclosing(stream.body()) as body:
        try:
            first = await anext(body)
        except (aioredis.RedisError, OSError):
            await _ask_to_retry(send, cors, "the event store is unavailable while the stream opens")
            return
        await send({"type": "http.response.start", "status": 200, "headers": _encode(headers)})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(stream, receive))
        try:
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _watch_disconnect(stream: Stream, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.close(CloseReason.CLIENT_GONE)
            return


async def _ask_to_retry(send: Send, cors: dict[str, str], why: str) -> None:
    """A transient fault: not a 5xx, which would stop EventSource for good, but a stream that says `retry:`
    and ends."""
    logger.warning("%s; asking the client to retry", why, exc_info=True)
    body = sse.retry(settings.EVENTS_RETRY_MS) + b": temporarily unavailable\n\n"
    await _respond(send, 200, body, "text/event-stream; charset=utf-8", {**cors, **_SSE_HEADERS})


async def _respond(send: Send, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
    all_headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}
    await send({"type": "http.response.start", "status": status, "headers": _encode(all_headers)})
    await send({"type": "http.response.body", "body": body})


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
