"""Who is asking: Django session, `Authorization: Bearer <JWT>`, or a single-use ticket."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import jwt
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.http import HttpRequest

from events import routing

TICKET_SECONDS = 30
VIEW_ALL = "subscriptions.view_all_process_instances"
# Query parameters that would carry a credential; refused so tokens never land in access logs.
QUERY_CREDENTIALS = frozenset({"access_token", "token", "jwt", "bearer", "authorization", "id_token"})


class AuthError(Exception):
    """Authentication was attempted and failed; the message is safe to show the client."""


@dataclass(frozen=True, slots=True)
class Identity:
    username: str
    method: str  # session, bearer or ticket
    expires_at: float | None  # a bearer token's exp; the stream ends then
    view_all: bool


def bearer_enabled() -> bool:
    return bool(settings.JWT_SECRET or settings.JWT_PUBLIC_KEY)


def _decode(token: str) -> dict[str, object]:
    key = settings.JWT_PUBLIC_KEY or settings.JWT_SECRET
    try:
        return jwt.decode(
            token,
            key=key,
            algorithms=settings.JWT_ALGORITHMS,
            audience=settings.JWT_AUDIENCE or None,
            issuer=settings.JWT_ISSUER or None,
            options={"verify_aud": bool(settings.JWT_AUDIENCE)},
            leeway=5,
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("bearer token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid bearer token: {exc}") from exc


def _ensure_user(username: str) -> AbstractBaseUser:
    user, _ = get_user_model().objects.get_or_create(username=username)
    return user


async def _user_for_token(username: str) -> tuple[AbstractBaseUser | None, bool]:
    """The matching Django user (created on first use) and whether it may follow every instance."""
    user = await sync_to_async(_ensure_user)(username)
    if not user.is_active:
        return None, False
    return user, await user.ahas_perm(VIEW_ALL)  # type: ignore[attr-defined]


async def from_bearer(header: str) -> Identity:
    if not bearer_enabled():
        raise AuthError("bearer authentication is not configured")
    claims = _decode(header.removeprefix("Bearer ").removeprefix("bearer ").strip())
    username = claims.get(settings.JWT_USER_CLAIM)
    if not isinstance(username, str) or not username or len(username) > 150:
        raise AuthError(f"bearer token has no usable {settings.JWT_USER_CLAIM!r} claim")
    user, view_all = await _user_for_token(username)
    if user is None:
        raise AuthError("user is inactive")
    exp = claims.get("exp")
    return Identity(username, "bearer", float(exp) if isinstance(exp, int | float) else None, view_all)


async def from_session(request: HttpRequest) -> Identity | None:
    user = await request.auser()
    if isinstance(user, AnonymousUser) or not user.is_authenticated or not user.is_active:
        return None
    return Identity(user.get_username(), "session", None, await user.ahas_perm(VIEW_ALL))


async def authenticate(request: HttpRequest, *, allow_ticket: bool, redis: aioredis.Redis | None) -> Identity | None:
    """The caller's identity, None if it presented nothing; AuthError if what it presented is bad."""
    if QUERY_CREDENTIALS & {key.lower() for key in request.GET}:
        raise AuthError("credentials are not accepted in the query string; use a header or a ticket")
    header = request.headers.get("Authorization", "")
    if header:
        if not header.lower().startswith("bearer "):
            raise AuthError("only Bearer authorization is supported")
        return await from_bearer(header)
    ticket = request.GET.get("ticket")
    if ticket is not None:
        if not allow_ticket or redis is None:
            raise AuthError("a ticket cannot be used here")
        return await redeem_ticket(redis, ticket)
    return await from_session(request)


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
    user, view_all = await _user_for_token(value["user"])
    if user is None:
        raise AuthError("user is inactive")
    return Identity(value["user"], "ticket", value.get("expires_at"), view_all)
