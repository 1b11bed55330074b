"""Token renewal of open bearer streams, end to end over HTTP with two web processes.

A bearer stream (a bearer header, or a ticket bought with one) says `token-expiring` EVENTS_TOKEN_RENEW_SECONDS
before its token's exp; POST /api/events/streams/<id>/token with a fresh token of the same user, to any web
process, moves its end; without that it ends with auth-expired. Wrong users, unknown or malformed ids, bad
tokens and tokens that are not later are refused with JSON.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import Client

from subscriptions.models import Subscription
from tests.harness import Gateway, Layout, token, wait_until
from tests.sse_client import SSEConnection, SSEEvent, open_stream

pytestmark = pytest.mark.django_db(transaction=True)

RENEW_SECONDS = 3
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def shared_layout() -> Layout:
    """Two web processes, so a renewal can be POSTed to the one that does not hold the stream."""
    return Layout(webs=2, env={"EVENTS_TOKEN_RENEW_SECONDS": str(RENEW_SECONDS), "CORS_ALLOWED_ORIGINS": ORIGIN})


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    return shared_gateway


def exp_of(bearer: str) -> int:
    import jwt  # noqa: PLC0415 - only to read back what the harness signed

    return int(jwt.decode(bearer, options={"verify_signature": False})["exp"])


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def post_token(base: str, stream_id: str, bearer: str | None, **headers: str) -> tuple[int, dict[str, Any]]:
    conn = await open_stream(
        base, path=f"/api/events/streams/{stream_id}/token", method="POST", token=bearer, headers=headers
    )
    try:
        return conn.status, json.loads(conn.body) if conn.body else {}
    finally:
        await conn.close()


async def ticket_for(base: str, bearer: str) -> str:
    conn = await open_stream(base, path="/api/events/tickets", method="POST", token=bearer)
    try:
        assert conn.status == 201, conn.body
        return str(json.loads(conn.body)["ticket"])
    finally:
        await conn.close()


async def open_bearer_stream(gateway: Gateway, bearer: str, *, via_ticket: bool) -> SSEConnection:
    """A stream on the first web process, opened with the bearer header or with a ticket bought with it."""
    if via_ticket:
        ticket = await ticket_for(gateway.webs[0].url, bearer)
        stream = await open_stream(gateway.webs[0].url, params=[("ticket", ticket)])
    else:
        stream = await open_stream(gateway.webs[0].url, token=bearer)
    assert stream.status == 200, stream.body
    return stream


async def next_named(stream: SSEConnection, timeout: float = 30) -> SSEEvent:
    event = await stream.next_event(timeout=timeout)
    assert event is not None, "the stream ended"
    return event


@pytest.mark.parametrize("via_ticket", [False, True], ids=["bearer-header", "ticket-bought-with-bearer"])
async def test_a_renewed_stream_outlives_its_first_token_then_ends_at_the_renewed_exp(
    gateway: Gateway, via_ticket: bool
) -> None:
    user = f"renew-{via_ticket}"
    first = token(user, ttl=RENEW_SECONDS + 3)
    async with await open_bearer_stream(gateway, first, via_ticket=via_ticket) as stream:
        expiring = await next_named(stream)
        assert expiring.event == "token-expiring"
        notice = expiring.json()
        assert epoch(notice["expiresAt"]) == exp_of(first)
        assert time.time() < exp_of(first)  # said before the end, not at it

        # Renewed through the other web process: only Redis connects the two.
        fresh = token(user, ttl=RENEW_SECONDS + 11)
        status, body = await post_token(gateway.webs[1].url, notice["stream"], fresh)
        assert status == 200, body
        assert set(body) == {"stream", "expiresAt"}
        assert body["stream"] == notice["stream"]
        assert epoch(body["expiresAt"]) == exp_of(fresh)
        # The same token again does not move the end: 409, saying where the end is.
        status, body = await post_token(gateway.webs[1].url, notice["stream"], fresh)
        assert (status, epoch(body["expiresAt"])) == (409, exp_of(fresh))

        # Past the first token's exp the stream still delivers, on the same connection.
        while time.time() < exp_of(first) + 2:
            await gateway.produce({"user": user, "event": "Tick", "data": time.time()})
            event = await next_named(stream)
            assert event.event == "Tick", event
        await gateway.produce({"user": user, "event": "After", "data": "past the first exp"})
        after = await next_named(stream)
        assert (after.event, after.json()["data"]) == ("After", "past the first exp")

        # Not renewed again: told before the new end, then ended there with auth-expired.
        second = await next_named(stream)
        assert second.event == "token-expiring"
        assert epoch(second.json()["expiresAt"]) == exp_of(fresh)
        ended = await next_named(stream)
        assert ended.event == "auth-expired"
        assert time.time() >= exp_of(fresh)
        assert await stream.next_block() is None


async def test_without_renewal_the_stream_ends_with_auth_expired(gateway: Gateway) -> None:
    bearer = token("no-renewal", ttl=RENEW_SECONDS + 2)
    async with await open_bearer_stream(gateway, bearer, via_ticket=True) as stream:
        assert (await next_named(stream)).event == "token-expiring"
        ended = await next_named(stream)
        assert ended.event == "auth-expired"
        assert time.time() >= exp_of(bearer)
        assert await stream.next_block() is None


async def test_refusals_wrong_user_unknown_or_malformed_id_bad_token_and_the_stream_still_ends(
    gateway: Gateway,
) -> None:
    owner = token("owner", ttl=RENEW_SECONDS + 6)
    async with await open_bearer_stream(gateway, owner, via_ticket=False) as stream:
        notice = (await next_named(stream)).json()
        stream_id = notice["stream"]
        base = gateway.webs[1].url

        # Someone else's stream and a stream that does not exist get the same answer.
        someone_else = await post_token(base, stream_id, token("intruder", ttl=3600))
        unknown = await post_token(base, "00000000-0000-4000-8000-000000000000", token("owner", ttl=3600))
        assert someone_else == unknown == (404, {"error": "no open stream of yours has this id"})

        for malformed in ("not-a-uuid", stream_id.upper(), stream_id + "0", "%2e%2e", "%20"):
            status, body = await post_token(base, malformed, token("owner", ttl=3600))
            assert status == 400, (malformed, body)
            assert "not a stream id" in body["error"]

        assert (await post_token(base, stream_id, None))[0] == 401
        assert (await post_token(base, stream_id, "not.a.jwt"))[0] == 401
        assert (await post_token(base, stream_id, token("owner", ttl=-60)))[0] == 401
        basic = await post_token(base, stream_id, None, Authorization="Basic b3duZXI6cHc=")
        assert basic[0] == 401
        # A token expiring before the stream's current end is not a renewal.
        earlier = await post_token(base, stream_id, token("owner", ttl=1))
        assert earlier[0] == 409
        assert epoch(earlier[1]["expiresAt"]) == exp_of(owner)
        wrong_method = await open_stream(base, path=f"/api/events/streams/{stream_id}/token", token=token("owner"))
        assert wrong_method.status == 405
        await wrong_method.close()

        # None of that renewed anything: the stream ends at the owner's first exp.
        ended = await next_named(stream)
        assert ended.event == "auth-expired"
        assert time.time() >= exp_of(owner)


async def test_a_stream_that_has_ended_cannot_be_renewed(gateway: Gateway) -> None:
    stream = await open_bearer_stream(gateway, token("leaver", ttl=RENEW_SECONDS + 2), via_ticket=False)
    async with stream:
        stream_id = (await next_named(stream)).json()["stream"]
        assert (await post_token(gateway.webs[1].url, stream_id, token("leaver", ttl=3600)))[0] == 200

    # The client left: the holding process releases the stream's slot a moment later.
    async def refused() -> bool:
        status, _ = await post_token(gateway.webs[1].url, stream_id, token("leaver", ttl=7200))
        assert status in (200, 409, 404)
        return status == 404

    await wait_until(refused, interval=0.2, what="the ended stream to be refused renewal")


def _session_cookie(username: str) -> str:
    user, _ = User.objects.get_or_create(username=username)
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def _stream_ids(user: str) -> list[str]:
    return [str(row.id) for row in Subscription.objects.filter(user=user)]


async def test_a_session_stream_has_no_token_to_renew(gateway: Gateway) -> None:
    cookie = await sync_to_async(_session_cookie)("by-session")
    async with await open_stream(gateway.webs[0].url, headers={"Cookie": f"sessionid={cookie}"}) as stream:
        assert stream.status == 200
        [stream_id] = await wait_until(lambda: sync_to_async(_stream_ids)("by-session"), what="the stream's audit row")
        status, body = await post_token(gateway.webs[1].url, stream_id, token("by-session", ttl=3600))
        assert (status, body) == (409, {"error": "this stream was not opened with a token: it has none to renew"})
        await gateway.produce({"user": "by-session", "data": "still open"})
        event = await next_named(stream)
        assert (event.event, event.json()["data"]) == ("message", "still open")


async def test_cors_for_the_renewal_is_the_tickets_cors(gateway: Gateway) -> None:
    path = "/api/events/streams/00000000-0000-4000-8000-000000000000/token"
    for target in (path, "/api/events/tickets"):
        preflight = await open_stream(
            gateway.url,
            path=target,
            method="OPTIONS",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status == 204
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        await preflight.close()
    status = await open_stream(gateway.url, path=path, method="POST", token=token("cors"), headers={"Origin": ORIGIN})
    assert status.status == 404
    assert status.headers["access-control-allow-origin"] == ORIGIN
    assert status.headers["access-control-allow-credentials"] == "true"
    await status.close()
    other = await open_stream(
        gateway.url, path=path, method="POST", token=token("cors"), headers={"Origin": "https://elsewhere.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    await other.close()
