"""The web edge under hostile requests and outages: cookies, Authorization headers, tokens, ids and
parameters, forwarded addresses, probes on any Host, the demo switch, slots on shutdown, a database outage."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from cryptography.hazmat.primitives.asymmetric import rsa
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from events.delivery import auth
from events.delivery.endpoint import client_address
from scripts.embedded import KafkaBroker, PostgresServer, RedisServer
from subscriptions.models import Subscription
from tests.harness import ROOT, Gateway, Layout, http_get, running, token, wait_until
from tests.sse_client import SSEConnection, open_stream
from tests.test_settings import PRODUCTION, manage

# The database is used here as the other end-to-end tests use it: the PostgreSQL pass leaves these out.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.incidental_db]


def _session_cookie(username: str) -> str:
    user, _ = get_user_model().objects.get_or_create(username=username)
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def _opened(conn: SSEConnection) -> bool:
    """The stream opened for real: 200 and its first block carries the starting position."""
    if conn.status != 200:
        return False
    block = await conn.next_block()
    while block is not None and block.get("id") is None:
        block = await conn.next_block()
    return block is not None


# --- who is asking ----------------------------------------------------------------------------------------
async def test_the_session_cookie_is_found_whatever_else_the_cookie_header_holds(gateway: Gateway) -> None:
    session = await sync_to_async(_session_cookie)("cookie-user")
    cookie = f'prefs={{"a":1}}; theme=dark mode; broken="; sessionid={session}; after=1'
    async with await open_stream(gateway.url, headers={"Cookie": cookie}) as stream:
        assert await _opened(stream)
        await gateway.produce({"user": "cookie-user", "data": "found"})
        [event] = await stream.events(1, timeout=30)
        assert event.json()["data"] == "found"


async def test_the_authorization_scheme_is_case_insensitive_and_another_scheme_does_not_hide_a_session(
    gateway: Gateway,
) -> None:
    shouting = await open_stream(gateway.url, headers={"Authorization": f"BEARER {token('loud')}"})
    assert await _opened(shouting)
    await shouting.close()

    session = await sync_to_async(_session_cookie)("behind-basic")
    headers = {"Authorization": "Basic cHJveHk6c2VjcmV0", "Cookie": f"sessionid={session}"}
    behind_proxy = await open_stream(gateway.url, headers=headers)
    assert await _opened(behind_proxy)
    await behind_proxy.close()

    only_basic = await open_stream(gateway.url, headers={"Authorization": "Basic cHJveHk6c2VjcmV0"})
    assert only_basic.status == 401
    assert "only Bearer" in json.loads(only_basic.body)["error"]


async def test_a_token_without_exp_is_refused(gateway: Gateway) -> None:
    forever = jwt.encode({"preferred_username": "forever"}, "test-jwt-secret-that-is-long-enough-for-hs256", "HS256")
    response = await open_stream(gateway.url, headers={"Authorization": f"Bearer {forever}"})
    assert response.status == 401
    assert "exp" in json.loads(response.body)["error"]


def test_the_deploy_check_warns_about_bearer_tokens_without_an_audience() -> None:
    without = manage("check", "--deploy", **PRODUCTION, JWT_SECRET="s" * 40, JWT_ALGORITHMS="HS256")
    assert "events.W001" in without.stderr + without.stdout
    with_audience = manage(
        "check", "--deploy", **PRODUCTION, JWT_SECRET="s" * 40, JWT_ALGORITHMS="HS256", JWT_AUDIENCE="events-gateway"
    )
    assert "events.W001" not in with_audience.stderr + with_audience.stdout


# --- JWKS ---------------------------------------------------------------------------------------------------
class _Jwks:
    """A JWKS endpoint on loopback whose keys can be rotated; counts the fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.fetches += 1
                body = json.dumps(
                    {
                        "keys": [
                            {
                                **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
                                "kid": kid,
                                "use": "sig",
                            }
                            for kid, key in jwks.keys.items()
                        ]
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def rotate(self, kid: str) -> None:
        self.keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048)}

    def token(self, kid: str, user: str, key: rsa.RSAPrivateKey | None = None) -> str:
        claims = {"preferred_username": user, "exp": int(time.time()) + 300, "aud": "events-gateway"}
        return jwt.encode(claims, key or self.keys[kid], "RS256", headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Jwks]:
    served = _Jwks()
    monkeypatch.setattr(auth, "_jwks", None)
    monkeypatch.setattr(auth, "JWKS_REFETCH_SECONDS", 0.5)
    try:
        with override_settings(
            JWT_JWKS_URL=served.url,
            JWT_SECRET="",
            JWT_PUBLIC_KEY="",
            JWT_ALGORITHMS=["RS256"],
            JWT_AUDIENCE="events-gateway",
        ):
            yield served
    finally:
        served.close()


async def test_jwks_keys_are_cached_rotated_and_made_up_key_ids_do_not_hammer_the_endpoint(jwks: _Jwks) -> None:
    jwks.rotate("k1")
    first = await auth.from_bearer(jwks.token("k1", "rot-1"))
    assert first.username == "rot-1"
    await auth.from_bearer(jwks.token("k1", "rot-2"))
    assert jwks.fetches == 1  # cached

    old_key = jwks.keys["k1"]
    jwks.rotate("k2")
    await asyncio.sleep(0.6)
    assert (await auth.from_bearer(jwks.token("k2", "rot-3"))).username == "rot-3"  # unknown kid: fetched again
    assert jwks.fetches == 2
    with pytest.raises(auth.AuthError):
        await auth.from_bearer(jwks.token("k1", "rot-4", key=old_key))  # the old key is gone

    before = jwks.fetches
    for n in range(20):
        with pytest.raises(auth.AuthError):
            await auth.from_bearer(jwks.token(f"made-up-{n}", "x", key=old_key))
    assert jwks.fetches - before <= 2  # at most one refetch per cooldown, not one per token


async def test_an_unreachable_jwks_endpoint_means_retry_not_refused(jwks: _Jwks) -> None:
    jwks.rotate("k1")
    signed = jwks.token("k1", "down")
    jwks.close()
    with pytest.raises(auth.AuthUnavailable):
        await auth.from_bearer(signed)


# --- parameters and headers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_options", "status"),
    [
        ({"headers": {"Last-Event-ID": "x" * 1025}}, 400),
        ({"params": [("since", "yesterday")]}, 400),
        ({"params": [("since", "2026-11-30T10:00:00")]}, 400),
        ({"params": [("since", str(10**14))]}, 400),
        ({"params": [("since", "0"), ("lastEventId", "1-0")]}, 400),
        ({"params": [("since", "1"), ("since", "2")]}, 400),
        ({"params": [("lastEventId", "1-0"), ("lastEventId", "2-0")]}, 400),
        ({"params": [("ticket", "a"), ("ticket", "b")]}, 400),
        ({"params": [("processInstanceUuid", "p" * 2000)]}, 400),
        ({"params": [("x", "y" * 9000)]}, 400),
        ({"params": [("processInstanceUuid", "\u0661/x")]}, 400),
        ({"method": "POST"}, 405),
        ({"method": "POST", "body": b"x" * 300_000}, 405),  # a body in several messages, read and let go
    ],
)
async def test_malformed_parameters_get_a_json_error(
    shared_gateway: Gateway, request_options: dict[str, Any], status: int
) -> None:
    response = await open_stream(shared_gateway.url, token=token("params"), **request_options)
    assert response.status == status
    assert "error" in json.loads(response.body)


async def test_a_repeated_authorization_header_is_refused(shared_gateway: Gateway) -> None:
    host, port = shared_gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    bearer = token("twice")
    writer.write(
        (
            f"GET /api/events/stream HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {bearer}\r\n"
            f"Authorization: Bearer {bearer}\r\n\r\n"
        ).encode()
    )
    conn = SSEConnection(reader, writer)
    await conn._read_head()
    assert conn.status == 400
    await conn.close()


@pytest.mark.parametrize("last_event_id", ["\u0661\u0662\u0663-\u0660", "12-0\x00", "-1-0", "9" * 16 + "-0", "abc"])
async def test_an_id_this_gateway_did_not_issue_gets_a_stream_reset(
    shared_gateway: Gateway, last_event_id: str
) -> None:
    async with await open_stream(
        shared_gateway.url, token=token("ids"), params=[("lastEventId", last_event_id)]
    ) as stream:
        assert stream.status == 200
        block = await stream.next_block()
        while block is not None and block.get("event") is None:
            block = await stream.next_block()
        assert block is not None
        assert block.get("event") == "stream-reset"


# --- forwarded addresses ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        ([], "203.0.113.9", "1.2.3.4", "203.0.113.9"),  # no proxies configured: the header is a client's word
        (["10.0.0.0/8"], "203.0.113.9", "1.2.3.4", "203.0.113.9"),  # not from a proxy
        (["10.0.0.0/8"], "10.0.0.2", "198.51.100.7", "198.51.100.7"),
        (["10.0.0.0/8"], "10.0.0.2", "6.6.6.6, 198.51.100.7, 10.0.0.3", "198.51.100.7"),  # forged left part
        (["10.0.0.2"], "10.0.0.2", "not an address", "not an address"),
        (["::1"], "::1", "2001:db8::5", "2001:db8::5"),
    ],
)
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    trusted: list[str], peer: str, forwarded: str, expected: str
) -> None:
    with override_settings(TRUSTED_PROXIES=trusted):
        assert client_address(peer, forwarded) == expected


async def test_a_forged_x_forwarded_for_is_not_audited(gateway: Gateway) -> None:
    async with await open_stream(gateway.url, token=token("forger"), headers={"X-Forwarded-For": "6.6.6.6"}) as s:
        assert await _opened(s)
    row = await wait_until(
        lambda: Subscription.objects.filter(user="forger", closed_at__isnull=False).afirst(), what="the stream's row"
    )
    assert row.client_address == "127.0.0.1"


# --- probes, the demo switch ----------------------------------------------------------------------------------
async def test_probes_answer_on_any_host_and_the_rest_stays_host_checked(
    kafka: KafkaBroker, redis_server: RedisServer, db_url: str
) -> None:
    env = {"DJANGO_DEBUG": "false", "DJANGO_ALLOWED_HOSTS": "events.example.com", "DEMO_ENABLED": "false"}
    async with running(
        bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url, layout=Layout(env=env)
    ) as gateway:
        for path in ("/healthz", "/readyz", "/metrics"):
            status, _ = await http_get(gateway.url + path)  # Host: 127.0.0.1:<port>
            assert status == 200, path
        refused = await open_stream(gateway.url, token=token("host"))
        assert refused.status == 400
        status, _ = await http_get(gateway.url + "/admin/login/")
        assert status == 400
        assert await _status(gateway.url, "/demo/", host="events.example.com") == 404
        assert await _status(gateway.url, "/admin/login/", host="events.example.com") == 200


async def _status(base: str, path: str, *, host: str) -> int:
    """The status of GET `path` sent with Host: `host`."""
    address, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


# --- slots on shutdown ----------------------------------------------------------------------------------------
async def test_a_graceful_shutdown_releases_slots_so_every_tab_reconnects_elsewhere(
    kafka: KafkaBroker, redis_server: RedisServer, db_url: str
) -> None:
    layout = Layout(webs=2, env={"EVENTS_MAX_STREAMS_PER_USER": "3"})
    async with running(bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url, layout=layout) as gw:
        first, second = gw.webs
        tabs = [await open_stream(first.url, token=token("tabs")) for _ in range(3)]
        for tab in tabs:
            assert await _opened(tab)
        first.proc.signal(signal.SIGTERM)
        for tab in tabs:  # each gets its final retry: and the end of the stream
            while await tab.next_block() is not None:
                pass
            assert tab.retry is not None
        again = [await open_stream(second.url, token=token("tabs")) for _ in range(3)]
        assert [tab.status for tab in again] == [200, 200, 200]
        for tab in [*tabs, *again]:
            await tab.close()


# --- a database outage ------------------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def postgres_gateway(
    kafka: KafkaBroker, redis_server: RedisServer
) -> AsyncIterator[tuple[Gateway, PostgresServer]]:
    """A deployment on a PostgreSQL of its own, which the test stops and starts."""
    postgres = await asyncio.to_thread(PostgresServer().start)
    gateway = Gateway(bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=postgres.url)
    try:
        await _manage(gateway, "migrate", "--no-input")
        await gateway.start()
        yield gateway, postgres
    finally:
        await gateway.stop()
        await asyncio.to_thread(postgres.close)


async def _manage(gateway: Gateway, *argv: str) -> str:
    """`manage.py <argv>` against the deployment's own database; its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "manage.py", *argv, cwd=ROOT, env=gateway.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    return output.decode()


async def _session_on(gateway: Gateway, username: str) -> str:
    """A logged-in session of `username` in the deployment's own database, made by its manage.py."""
    code = (
        "from django.contrib.auth import get_user_model; from django.test import Client; "
        f"u, _ = get_user_model().objects.get_or_create(username={username!r}); c = Client(); c.force_login(u); "
        "print(c.cookies['sessionid'].value)"
    )
    output = await _manage(gateway, "shell", "-c", code)
    return output.strip().splitlines()[-1]


async def _grant_on(gateway: Gateway, user: str, process_instance: str) -> None:
    code = (
        "from django.utils import timezone; from subscriptions.models import Grant; "
        f"Grant.objects.create(user={user!r}, process_instance={process_instance!r}, granted_at=timezone.now(), "
        "granted_by='test', source='admin')"
    )
    await _manage(gateway, "shell", "-c", code)


@pytest.mark.slow
async def test_a_database_outage_asks_clients_to_retry_and_every_path_works_after_it(
    postgres_gateway: tuple[Gateway, PostgresServer],
) -> None:
    gateway, postgres = postgres_gateway
    session = await _session_on(gateway, "pg-session")
    await _grant_on(gateway, "pg-session", "pg-pi")
    # A bearer user seen before the outage is cached for a while, so it can still get and use tickets.
    async with await open_stream(gateway.url, token=token("pg-ticketed")) as warm:
        assert await _opened(warm)

    await asyncio.to_thread(postgres.stop)
    needs_the_database: list[dict[str, Any]] = [
        {"headers": {"Cookie": f"sessionid={session}"}},
        {"headers": {"Cookie": f"sessionid={session}"}, "params": [("processInstanceUuid", "pg-pi")]},
        {"token": token("pg-new-user")},
        {"token": token("pg-new-user-2"), "params": [("processInstanceUuid", "pg-pi")]},
    ]
    for options in needs_the_database:
        response = await open_stream(gateway.url, **options)
        assert response.status == 200, (options, response.status, response.body)
        blocks = []
        while (block := await response.next_block()) is not None:
            blocks.append(block)
        # Told to retry, then the stream ended, before any position: nothing was opened.
        assert [b.get("retry") for b in blocks if b.get("retry")] == ["3000"], options
        assert not [b for b in blocks if b.get("id") is not None], options
    issued = await open_stream(gateway.url, path="/api/events/tickets", method="POST", token=token("pg-ticketed"))
    assert issued.status == 201
    by_ticket = await open_stream(gateway.url, params=[("ticket", json.loads(issued.body)["ticket"])])
    assert await _opened(by_ticket)
    await by_ticket.close()
    status, _ = await http_get(gateway.url + "/readyz")
    assert status == 503
    no_ticket = await open_stream(gateway.url, path="/api/events/tickets", method="POST", token=token("pg-new-3"))
    assert no_ticket.status == 503
    assert "error" in json.loads(no_ticket.body)

    await asyncio.to_thread(postgres.start)
    await wait_until(lambda: _ready(gateway), timeout=60, what="readiness after the database returns")
    issued = await open_stream(gateway.url, path="/api/events/tickets", method="POST", token=token("pg-fresh"))
    assert issued.status == 201
    working: list[dict[str, Any]] = [
        {"params": [("ticket", json.loads(issued.body)["ticket"])]},
        {"headers": {"Cookie": f"sessionid={session}"}, "params": [("processInstanceUuid", "pg-pi")]},
        {"token": token("pg-after")},
    ]
    for options in working:
        async with await open_stream(gateway.url, **options) as stream:
            assert await _opened(stream), options
    async with await open_stream(
        gateway.url, headers={"Cookie": f"sessionid={session}"}, params=[("processInstanceUuid", "pg-pi")]
    ) as stream:
        assert await _opened(stream)
        await gateway.produce({"processInstanceUuid": "pg-pi", "user": "pg-session", "data": "live"})
        [event] = await stream.events(1, timeout=30)
        assert event.json()["data"] == "live"


async def _ready(gateway: Gateway) -> bool:
    return (await http_get(gateway.url + "/readyz"))[0] == 200
