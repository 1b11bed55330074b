"""Who is asking: Django session, `Authorization: Bearer <JWT>`, or a single-use ticket."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from typing import Any, TypeVar

import jwt
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user, get_user_model
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from django.http import HttpRequest

from events.core import routing

T = TypeVar("T")
TICKET_SECONDS = 30
VIEW_ALL = "subscriptions.view_all_process_instances"
# Query parameters that would carry a credential; refused so tokens never land in access logs.
QUERY_CREDENTIALS = frozenset({"access_token", "token", "jwt", "bearer", "authorization", "id_token"})


class AuthError(Exception):
    """Authentication was attempted and failed; the message is safe to show the client."""


class AuthUnavailable(Exception):
    """Authentication could not be decided now (the database or the JWKS endpoint is down): retry later."""


@dataclass(frozen=True, slots=True)
class Identity:
    username: str
    method: str  # session, bearer or ticket
    expires_at: float | None  # a bearer token's exp; the stream ends then
    view_all: bool


def bearer_enabled() -> bool:
    return bool(settings.JWT_SECRET or settings.JWT_PUBLIC_KEY or settings.JWT_JWKS_URL)


def bearer_token(authorization: str) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme in any case); None for another scheme."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# Keys fetched from JWT_JWKS_URL are kept this long. A token naming a key not in the set (a rotation)
# fetches the set again, but at most once per JWKS_REFETCH_SECONDS: tokens with made-up key ids must not
# turn into a request each to the identity provider.
JWKS_CACHE_SECONDS = 300
JWKS_REFETCH_SECONDS = 10
JWKS_TIMEOUT_SECONDS = 5
_jwks: jwt.PyJWKClient | None = None


def _jwks_client() -> jwt.PyJWKClient:
    global _jwks  # noqa: PLW0603 - one client (and its key cache) per process
    if _jwks is None or _jwks.uri != settings.JWT_JWKS_URL:
        _jwks = jwt.PyJWKClient(
            settings.JWT_JWKS_URL,
            lifespan=JWKS_CACHE_SECONDS,
            timeout=JWKS_TIMEOUT_SECONDS,
            cooldown_duration=JWKS_REFETCH_SECONDS,
        )
    return _jwks


def _signing_key(token: str) -> object:
    """The key to check `token` with: from the JWKS endpoint when the token names a `kid` and one is
    configured, else the configured public key or secret."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid bearer token: {exc}") from exc
    if settings.JWT_JWKS_URL and (kid or not (settings.JWT_PUBLIC_KEY or settings.JWT_SECRET)):
        try:
            return _jwks_client().get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            raise AuthUnavailable(f"the JWKS endpoint cannot be reached: {exc}") from exc
        except jwt.PyJWKClientError as exc:
            raise AuthError(f"invalid bearer token: {exc}") from exc
    return settings.JWT_PUBLIC_KEY or settings.JWT_SECRET


def _decode(token: str) -> dict[str, object]:
    """Check `token` (sync: fetching JWKS keys is blocking I/O). `exp` is required: a stream opened with a
    token lives no longer than the token."""
    key = _signing_key(token)
    try:
        return jwt.decode(
            token,
            key=key,  # type: ignore[arg-type]
            algorithms=settings.JWT_ALGORITHMS,
            audience=settings.JWT_AUDIENCE or None,
            issuer=settings.JWT_ISSUER or None,
            options={"verify_aud": bool(settings.JWT_AUDIENCE), "require": ["exp"]},
            leeway=5,
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("bearer token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid bearer token: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented, taken from its headers, query and cookies."""

    query_keys: frozenset[str]
    authorization: str
    ticket: str | None
    session_key: str | None


# Database work here runs on the loop's shared executor (thread_sensitive=False), not in a thread of the
# request's own: a stream lives for hours, and a thread held per stream costs more than the stream.


# A reconnect storm (a web process restarting under 10,000 streams) would otherwise cost a user lookup
# and two permission queries per stream. Deactivation or a permission change takes effect within this.
USER_CACHE_SECONDS = 30.0
_user_cache: dict[str, tuple[float, bool, bool]] = {}


def _token_user(username: str) -> tuple[bool, bool]:
    """Match or create the token's user: (is active, may follow every process instance)."""
    cached = _user_cache.get(username)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1], cached[2]
    with _reconnecting():
        user, _ = get_user_model().objects.get_or_create(username=username)
        found = (user.is_active, user.is_active and user.has_perm(VIEW_ALL))
    if len(_user_cache) > 100_000:
        _user_cache.clear()
    _user_cache[username] = (time.monotonic() + USER_CACHE_SECONDS, *found)
    return found


def _session_user(session_key: str) -> tuple[str, bool] | None:
    """The logged-in user of a session (Django's own checks, session hash included), or None."""
    with _reconnecting():
        request = HttpRequest()
        request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        user = get_user(request)
        if not user.is_authenticated or not user.is_active:
            return None
        return user.get_username(), user.has_perm(VIEW_ALL)


@contextlib.contextmanager
def _reconnecting() -> Iterator[None]:
    """Executor threads keep their connection between calls; a broken one is dropped so the next call
    reconnects (there is no request cycle here to recycle connections). A database that cannot answer
    is AuthUnavailable: the client is asked to retry, never refused."""
    try:
        yield
    except DatabaseError as exc:
        with contextlib.suppress(DatabaseError):
            connection.close()
        if isinstance(exc, InterfaceError | OperationalError):
            raise AuthUnavailable(f"the database cannot be reached: {exc}") from exc
        raise


def database_call(function: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """`function` (sync, using the ORM) run on the shared executor, reconnecting after a failure."""

    def call(*args: Any, **kwargs: Any) -> T:
        with _reconnecting():
            return function(*args, **kwargs)

    return sync_to_async(call, thread_sensitive=False)


async def from_bearer(token: str) -> Identity:
    if not bearer_enabled():
        raise AuthError("bearer authentication is not configured")
    if settings.JWT_JWKS_URL:
        claims = await sync_to_async(_decode, thread_sensitive=False)(token)
    else:
        claims = _decode(token)
    username = claims.get(settings.JWT_USER_CLAIM)
    if not isinstance(username, str) or not username or len(username) > 150:
        raise AuthError(f"bearer token has no usable {settings.JWT_USER_CLAIM!r} claim")
    active, view_all = await sync_to_async(_token_user, thread_sensitive=False)(username)
    if not active:
        raise AuthError("user is inactive")
    exp = claims.get("exp")
    return Identity(username, "bearer", float(exp) if isinstance(exp, int | float) else None, view_all)


async def from_session(session_key: str) -> Identity | None:
    found = await sync_to_async(_session_user, thread_sensitive=False)(session_key)
    return Identity(found[0], "session", None, found[1]) if found else None


async def authenticate(credentials: Credentials, *, allow_ticket: bool, redis: aioredis.Redis) -> Identity | None:
    """The caller's identity, None if it presented nothing; AuthError if what it presented is bad."""
    if QUERY_CREDENTIALS & {key.lower() for key in credentials.query_keys}:
        raise AuthError("credentials are not accepted in the query string; use a header or a ticket")
    token = bearer_token(credentials.authorization) if credentials.authorization else None
    if token is not None:
        return await from_bearer(token)
    if credentials.ticket is not None:
        if not allow_ticket:
            raise AuthError("a ticket cannot be used here")
        return await redeem_ticket(redis, credentials.ticket)
    if credentials.session_key:
        return await from_session(credentials.session_key)
    if credentials.authorization:
        # Another scheme (a proxy's Basic, say) with nothing else: say what is accepted.
        raise AuthError("only Bearer authorization is supported")
    return None


async def issue_ticket(redis: aioredis.Redis, identity: Identity) -> tuple[str, int]:
    """A single-use ticket standing for `identity`; returns it and its lifetime in seconds."""
    ticket = secrets.token_urlsafe(32)
    lifetime = TICKET_SECONDS
    if identity.expires_at is not None:
        lifetime = max(1, min(lifetime, int(identity.expires_at - time.time())))
    value = {"user": identity.username, "expires_at": identity.expires_at, "via": identity.method}
    await redis.set(routing.TICKET_PREFIX + ticket, json.dumps(value), ex=lifetime)
    return ticket, lifetime


async def redeem_ticket(redis: aioredis.Redis, ticket: str) -> Identity:
    if not ticket or len(ticket) > 100:
        raise AuthError("invalid ticket")
    raw = await redis.getdel(routing.TICKET_PREFIX + ticket)
    if raw is None:
        raise AuthError("ticket unknown, expired or already used")
    value = json.loads(raw)
    active, view_all = await sync_to_async(_token_user, thread_sensitive=False)(value["user"])
    if not active:
        raise AuthError("user is inactive")
    return Identity(value["user"], "ticket", value.get("expires_at"), view_all)
