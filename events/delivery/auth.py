"""Who is asking: Django session, `Authorization: Bearer <JWT>`, or a single-use ticket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from importlib import import_module
from typing import Any, TypeVar, cast

import jwt
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user, get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import Permission
from django.contrib.sessions.backends.base import SessionBase
from django.core.cache import BaseCache, caches
from django.core.exceptions import ValidationError
from django.db import DatabaseError, InterfaceError, OperationalError, connection, connections, router
from django.db.models import Exists, Field, OuterRef
from django.http import HttpRequest
from django.utils.crypto import constant_time_compare

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
    configured = settings.JWT_PUBLIC_KEY or settings.JWT_SECRET
    if not settings.JWT_JWKS_URL:
        return configured
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid bearer token: {exc}") from exc
    if kid or not configured:
        try:
            return _jwks_client().get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            raise AuthUnavailable(f"the JWKS endpoint cannot be reached: {exc}") from exc
        except jwt.PyJWKClientError as exc:
            raise AuthError(f"invalid bearer token: {exc}") from exc
    return configured


def _key_checking_once(decoder: jwt.PyJWT) -> jwt.PyJWT:
    """`decoder` with each algorithm's preparation of a configured key (str or bytes) remembered per key.
    Preparing it (parsing a PEM key; for HMAC, checking that the secret is not an asymmetric key) cost as
    much as checking the signature itself, on every token; the result depends on the key alone. Key
    objects (from JWKS) are prepared already and pass through."""
    jws = decoder._jws  # PyJWT offers no public way to give a decoder algorithms of its own
    for name in jwt.algorithms.get_default_algorithms():
        algorithm = jws.get_algorithm_by_name(name)
        algorithm.prepare_key = _remembered(algorithm.prepare_key)  # type: ignore[method-assign,assignment]
    return decoder


def _remembered(prepare: Callable[[Any], Any]) -> Callable[[Any], Any]:
    prepared: dict[str | bytes, Any] = {}

    def prepare_key(key: Any) -> Any:
        if not isinstance(key, str | bytes):
            return prepare(key)
        found = prepared.get(key)
        if found is None:
            found = prepare(key)  # a key it refuses raises, and is not remembered
            if len(prepared) < 8:  # the configured key; a settings change in tests adds a few
                prepared[key] = found
        return found

    return prepare_key


_decoder = _key_checking_once(jwt.PyJWT())


def _decode(token: str) -> dict[str, object]:
    """Check `token` fully: signature, `exp` (required: a stream opened with a token lives no longer than
    the token), audience and issuer when configured. Sync: fetching JWKS keys is blocking I/O."""
    key = _signing_key(token)
    try:
        return _decoder.decode(
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


def _call(function: Callable[..., T], *args: Any) -> T:
    return function(*args)


# Made once: building a sync_to_async wrapper costs more than the cache lookup it would guard.
_in_executor = sync_to_async(_call, thread_sensitive=False)


# --- accounts: what opening a stream needs to know of a user --------------------------------------------
# A user's account is read from the database at most once per USER_CACHE_SECONDS per web process, so that
# a reconnect storm (a web process restarting under 10,000 streams) costs one query per user, not three or
# four per stream. The bound this puts on changes, for streams opened afterwards (open streams are not
# affected): deactivating a user, changing their password (which ends their sessions) or their permissions
# takes effect within USER_CACHE_SECONDS. Logging out takes effect at once (the session is read every
# time); grants are read on every open (docs/production.md, "Sessions, accounts and reconnect storms").
USER_CACHE_SECONDS = 30.0
MAX_CACHED_ACCOUNTS = 100_000


@dataclass(frozen=True, slots=True)
class Account:
    user_id: Any
    username: str
    active: bool
    view_all: bool  # may follow every process instance
    session_hash: str  # what a session of this user must carry (Django's get_session_auth_hash)


class _Cache:
    """Accounts by name and by id for USER_CACHE_SECONDS, read in the event loop without a thread hop."""

    def __init__(self) -> None:
        self._values: dict[Hashable, tuple[float, Account]] = {}

    def get(self, key: Hashable) -> Account | None:
        found = self._values.get(key)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            del self._values[key]
            return None
        return found[1]

    def put(self, account: Account) -> None:
        if len(self._values) >= MAX_CACHED_ACCOUNTS:
            now = time.monotonic()
            self._values = {k: v for k, v in self._values.items() if v[0] > now}
            if len(self._values) >= MAX_CACHED_ACCOUNTS:
                self._values.clear()
        expires = time.monotonic() + USER_CACHE_SECONDS
        self._values[("name", account.username)] = (expires, account)
        self._values[("id", account.user_id)] = (expires, account)


# Accounts one query looks up at most (well within SQLite's and PostgreSQL's parameter limits).
MAX_BATCH = 500


class _Batches:
    """Accounts missing from the cache, looked up together: one task looks up the misses queued so far while
    the next ones queue, then takes those. A storm of streams of U users costs a few queries, not U; the
    streams of one user wait for the same lookup. Each waiter waits on its key's future alone (no lock to
    pass from waiter to waiter); a waiter that leaves does not stop the lookup the others wait for."""

    def __init__(self, kind: str, load_many: Callable[[list[Any]], dict[Any, Account]]) -> None:
        self.kind = kind
        self._load_many = load_many
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued: dict[Any, asyncio.Future[Account | None]] = {}
        self._looking_up: dict[Any, asyncio.Future[Account | None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def get(self, key: Any) -> Account | None:
        """The account for `key` (cached, or looked up with others), None if there is none."""
        cached = _accounts.get((self.kind, key))
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # another event loop (tests run several): nothing pending carries over
            self._loop, self._queued, self._looking_up, self._task = loop, {}, {}, None
        future = self._looking_up.get(key) or self._queued.get(key)
        if future is None:
            future = self._queued[key] = loop.create_future()
            if self._task is None:
                self._task = loop.create_task(self._run(), name=f"account lookups by {self.kind}")
        return await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._queued:
                keys = list(itertools.islice(self._queued, MAX_BATCH))
                self._looking_up = {key: self._queued.pop(key) for key in keys}
                try:
                    found = await _in_executor(self._load_many, keys)
                except Exception as exc:  # noqa: BLE001 - every waiter of the batch gets it raised
                    for future in self._looking_up.values():
                        future.set_exception(exc)
                        future.exception()  # retrieved: its waiters raise it; one nobody waits for is fine too
                else:
                    for key, future in self._looking_up.items():
                        account = found.get(key)
                        if account is not None:
                            _accounts.put(account)
                        future.set_result(account)
                self._looking_up = {}
        finally:  # cancelled (the loop is closing): nobody is left waiting for an answer
            for future in [*self._looking_up.values(), *self._queued.values()]:
                future.cancel()
            self._looking_up, self._queued, self._task = {}, {}, None


_accounts = _Cache()


def _view_all_codename() -> tuple[str, str]:
    app_label, _, codename = VIEW_ALL.partition(".")
    return app_label, codename


def _account_of(user: AbstractBaseUser) -> Account:
    return Account(
        user_id=user.pk,
        username=user.get_username(),
        active=bool(user.is_active),
        view_all=bool(user.is_active and user.has_perm(VIEW_ALL)),  # type: ignore[attr-defined]
        session_hash=user.get_session_auth_hash(),
    )


def _with_view_all(queryset: Any) -> Any:
    """Annotate users with whether they hold VIEW_ALL, in the same query (Django's has_perm takes two
    more). Only for the model backend's rules: superuser, the user's own permissions, their groups'."""
    app_label, codename = _view_all_codename()
    held = Permission.objects.filter(content_type__app_label=app_label, codename=codename)
    return queryset.annotate(
        _perm_direct=Exists(held.filter(user=OuterRef("pk"))),
        _perm_group=Exists(held.filter(group__user=OuterRef("pk"))),
    )


_MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


class _AccountQuery:
    """Users whose `field` is one of some values, with whether each holds VIEW_ALL: one statement, compiled by
    the ORM once per database connection and size, and run with the values of each batch.

    Compiling the query (a lookup and two EXISTS annotations) was nearly all of its cost: about 40 µs per
    user at 50 users a query, on the executor thread, holding the GIL the event loop needed to accept
    connections. Run from its compiled SQL it costs a few microseconds per user. Sizes are rounded up to a
    power of two (the values padded with the last one) so that a handful of statements serves every batch."""

    def __init__(self, field: str) -> None:
        self.field = field
        # By connection (each executor thread has its own; the compiler's converters are given it) and size.
        self._compiled: dict[tuple[Any, int], _Compiled] = {}

    def accounts(self, values: list[Any]) -> list[Account]:
        if not values:
            return []
        model = get_user_model()
        alias = router.db_for_read(model)
        db = connections[alias]
        field = cast(Field, model._meta.pk if self.field == "pk" else model._meta.get_field(self.field))
        size = 1 << (len(values) - 1).bit_length()
        padded = values + [values[-1]] * (size - len(values))
        prepared = [field.get_db_prep_value(value, db) for value in padded]
        compiled = self._compiled.get((db, size))
        if compiled is None:
            compiled = _Compiled(self.field, padded, prepared, db)
            if compiled.reusable:
                self._compiled[(db, size)] = compiled
        with db.cursor() as cursor:
            cursor.execute(compiled.sql, compiled.params_with(prepared))
            rows = cursor.fetchall()
        # A user with only what its session hash needs loaded (from_db takes them in the model's field order).
        loaded = [f.attname for f in model._meta.concrete_fields if f.attname in {"password", model._meta.pk.attname}]
        accounts = []
        for pk, name, password, active, superuser, direct, group in compiled.converted(rows):
            user = model.from_db(alias, loaded, [password if n == "password" else pk for n in loaded])
            accounts.append(
                Account(
                    user_id=pk,
                    username=name,
                    active=bool(active),
                    view_all=bool(active and (superuser or direct or group)),
                    session_hash=user.get_session_auth_hash(),
                )
            )
        return accounts


class _Compiled:
    """The account query's SQL for one database and number of values, and where the values go in its
    parameters (last: the annotations' come first, in the SELECT list)."""

    def __init__(self, field: str, values: list[Any], prepared: list[Any], db: Any) -> None:
        model = get_user_model()
        columns = ("pk", model.USERNAME_FIELD, "password", "is_active", "is_superuser", "_perm_direct", "_perm_group")
        queryset = _with_view_all(model.objects.filter(**{f"{field}__in": values})).values_list(*columns)
        self._compiler = queryset.query.get_compiler(connection=db)
        self.sql, params = self._compiler.as_sql()
        self._params = list(params)
        self._at = len(self._params) - len(prepared)
        # Checked, not assumed: should the ORM ever place or prepare them otherwise, the statement is used
        # for this batch only and compiled again for the next.
        self.reusable = self._params[self._at :] == prepared
        self._converters = self._compiler.get_converters([column for column, _, _ in self._compiler.select])

    def params_with(self, prepared: list[Any]) -> list[Any]:
        if not self.reusable:
            return self._params
        return self._params[: self._at] + prepared

    def converted(self, rows: list[Any]) -> Iterable[Any]:
        return self._compiler.apply_converters(rows, self._converters) if self._converters else rows


_by_username_query = _AccountQuery("username")
_by_pk_query = _AccountQuery("pk")


def _load_by_usernames(usernames: list[str]) -> dict[str, Account]:
    """Match or create tokens' users: one query for those that exist; those seen for the first time are
    created together (a reconnect storm of new users is a few queries, not three per user)."""
    with _reconnecting():
        model = get_user_model()
        users = model.objects
        found: dict[str, Account] = {}
        if _model_backend_only():
            found = {account.username: account for account in _by_username_query.accounts(usernames)}
            missing = [u for u in usernames if u not in found]
            if missing:
                # Another process may create some of them meanwhile: those rows are left as they are.
                users.bulk_create([model(username=u) for u in missing], ignore_conflicts=True)
                found.update((account.username, account) for account in _by_username_query.accounts(missing))
        for username in usernames:
            if username not in found:
                user, _ = users.get_or_create(username=username)
                found[username] = _account_of(user)
        return found


def _load_by_ids(user_ids: list[Any]) -> dict[Any, Account]:
    """Sessions' users by id, in one query; those that no longer exist are left out."""
    with _reconnecting():
        return {account.user_id: account for account in _by_pk_query.accounts(user_ids)}


def _model_backend_only() -> bool:
    return list(settings.AUTHENTICATION_BACKENDS) == [_MODEL_BACKEND]


_by_name = _Batches("name", _load_by_usernames)
_by_id = _Batches("id", _load_by_ids)


async def token_account(username: str) -> Account:
    """The account of a token's (or ticket's) user, created on first sight."""
    account = await _by_name.get(username)
    assert account is not None
    return account


@dataclass(frozen=True, slots=True)
class _SessionClaim:
    store: SessionBase
    user_id: Any
    backend: str
    session_hash: str


@functools.cache
def _session_cache() -> BaseCache:
    """One cache client for session reads, for the life of the process. Django's `caches[alias]` is local to
    the context, and every executor call runs in a fresh copy of one: each session read made a client, a
    connection pool and a new Redis connection of its own (half the web process's time in a storm)."""
    return caches.create_connection(settings.SESSION_CACHE_ALIAS)


def _read_session(session_key: str) -> _SessionClaim | None:
    """A session's data (with the cached_db engine, from Redis; the database only when not cached there)."""
    with _reconnecting():
        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        if hasattr(store, "_cache"):  # the cache and cached_db engines: read through the shared client
            store._cache = _session_cache()
        try:
            user_id = get_user_model()._meta.pk.to_python(store[SESSION_KEY])
            backend = store[BACKEND_SESSION_KEY]
        except (KeyError, ValidationError):
            return None
        return _SessionClaim(store, user_id, backend, store.get(HASH_SESSION_KEY) or "")


def _session_user(store: SessionBase) -> Account | None:
    """Django's own checks of a session's user (backend, active, session hash and its fallbacks)."""
    with _reconnecting():
        request = HttpRequest()
        request.session = store
        user = get_user(request)
        if not user.is_authenticated or not user.is_active:
            return None
        return _account_of(user)


async def session_account(session_key: str) -> Account | None:
    """The active user logged in by a session, or None. The session is read every time (logging out takes
    effect at once); its user's account comes from the cache (or one query) when the session's hash matches
    it, else from Django's own checks (which also accept a hash made with a SECRET_KEY_FALLBACKS key)."""
    claim = await _in_executor(_read_session, session_key)
    if claim is None or claim.backend not in settings.AUTHENTICATION_BACKENDS:
        return None
    if claim.backend == _MODEL_BACKEND and claim.session_hash:
        account = await _by_id.get(claim.user_id)
        if account is None or not account.active:
            return None
        if constant_time_compare(claim.session_hash, account.session_hash):
            return account
    account = await _in_executor(_session_user, claim.store)
    if account is not None:
        _accounts.put(account)
    return account


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
        claims = await _in_executor(_decode, token)
    else:
        claims = _decode(token)
    username = claims.get(settings.JWT_USER_CLAIM)
    if not isinstance(username, str) or not username or len(username) > 150:
        raise AuthError(f"bearer token has no usable {settings.JWT_USER_CLAIM!r} claim")
    account = await token_account(username)
    if not account.active:
        raise AuthError("user is inactive")
    exp = claims.get("exp")
    return Identity(username, "bearer", float(exp) if isinstance(exp, int | float) else None, account.view_all)


async def from_session(session_key: str) -> Identity | None:
    account = await session_account(session_key)
    return Identity(account.username, "session", None, account.view_all) if account else None


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
    account = await token_account(value["user"])
    if not account.active:
        raise AuthError("user is inactive")
    return Identity(value["user"], "ticket", value.get("expires_at"), account.view_all)
