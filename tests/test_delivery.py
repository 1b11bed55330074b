"""GET /api/events/stream end to end: authentication, authorisation, wire format, resume, unsubscribe."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.test import Client

from events.core.store import parse_id
from subscriptions.models import Grant
from tests.harness import Gateway, token
from tests.sse_client import SSEEvent, open_stream

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """This module's tests share one deployment (conftest's default shared_layout)."""
    return shared_gateway


def _session_cookie(username: str, *, view_all: bool = False) -> str:
    user = User.objects.create_user(username, password="unused-password")
    if view_all:
        user.user_permissions.add(Permission.objects.get(codename="view_all_process_instances"))
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def session_cookie(username: str, *, view_all: bool = False) -> dict[str, str]:
    return {"Cookie": "sessionid=" + await sync_to_async(_session_cookie)(username, view_all=view_all)}


async def grant(user: str, process_instance: str) -> None:
    await Grant.objects.acreate(
        user=user, process_instance=process_instance, granted_at=datetime.now(UTC), granted_by="test", source="admin"
    )


def datas(events: list[SSEEvent]) -> list[object]:
    return [e.json()["data"] for e in events]


# --- authentication ------------------------------------------------------------------------------------
async def test_session_bearer_and_ticket_each_open_a_stream(gateway: Gateway) -> None:
    cookie = await session_cookie("sam")
    ticket_response = await open_stream(gateway.url, path="/api/events/tickets", method="POST", token=token("tess"))
    assert ticket_response.status == 201
    ticket = json.loads(ticket_response.body)["ticket"]
    assert json.loads(ticket_response.body)["expiresIn"] == 30
    await ticket_response.close()
    async with (
        await open_stream(gateway.url, headers=cookie) as by_session,
        await open_stream(gateway.url, token=token("tess")) as by_bearer,
        await open_stream(gateway.url, params=[("ticket", ticket)]) as by_ticket,
    ):
        assert (by_session.status, by_bearer.status, by_ticket.status) == (200, 200, 200)
        await gateway.produce({"user": "sam", "data": "for sam"})
        await gateway.produce({"user": "tess", "data": "for tess"})
        assert datas(await by_session.events(1)) == ["for sam"]
        assert datas(await by_bearer.events(1)) == ["for tess"]
        assert datas(await by_ticket.events(1)) == ["for tess"]
    reused = await open_stream(gateway.url, params=[("ticket", ticket)])
    assert reused.status == 401
    assert "already used" in json.loads(reused.body)["error"]
    await reused.close()


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({}, 401, "authentication required"),
        ({"token": "not-a-jwt"}, 401, "invalid bearer token"),
        ({"token": token("ann", ttl=-60)}, 401, "expired"),
        ({"headers": {"Authorization": "Basic YTpi"}}, 401, "only Bearer"),
        ({"params": [("access_token", token("ann"))]}, 401, "query string"),
        ({"params": [("ticket", "nope")]}, 401, "ticket unknown"),
        ({"token": token("ann"), "params": [("processInstanceUuid", "p")] * 21}, 400, "at most 20"),
        ({"token": token("ann"), "params": [("processInstanceUuid", "bad/uuid")]}, 400, "processInstanceUuid"),
        ({"token": token("ann"), "params": [("processInstanceUuid", "not-granted")]}, 403, "not-granted"),
    ],
)
async def test_refusals_are_json_with_the_right_status(
    gateway: Gateway, kwargs: dict[str, object], status: int, message: str
) -> None:
    response = await open_stream(gateway.url, **kwargs)  # type: ignore[arg-type]
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert message in json.loads(response.body)["error"]
    await response.close()


async def test_session_ticket_needs_csrf(gateway: Gateway) -> None:
    cookie = await session_cookie("sam")
    response = await open_stream(gateway.url, path="/api/events/tickets", method="POST", headers=cookie)
    assert response.status == 403
    assert "CSRF" in json.loads(response.body)["error"]
    await response.close()


# --- authorisation --------------------------------------------------------------------------------------
async def test_users_only_ever_see_their_own_events(gateway: Gateway) -> None:
    """Every combination of targets: user, process instance with and without user, broadcast."""
    for user in ("alice", "bob"):
        await grant(user, "shared")
    await grant("alice", "alice-only")
    alice = await open_stream(
        gateway.url,
        token=token("alice"),
        params=[("processInstanceUuid", "shared"), ("processInstanceUuid", "alice-only")],
    )
    bob = await open_stream(gateway.url, token=token("bob"), params=[("processInstanceUuid", "shared")])
    carol = await open_stream(gateway.url, token=token("carol"))
    envelopes: list[dict[str, object]] = [
        {"user": "alice", "data": "alice"},
        {"user": "bob", "data": "bob"},
        {"processInstanceUuid": "shared", "data": "shared"},
        {"processInstanceUuid": "shared", "user": "alice", "data": "shared+alice"},
        {"processInstanceUuid": "shared", "user": "bob", "data": "shared+bob"},
        {"processInstanceUuid": "alice-only", "data": "alice-only"},
        {"processInstanceUuid": "alice-only", "user": "bob", "data": "alice-only+bob"},
        {"processInstanceUuid": "unfollowed", "data": "unfollowed"},
        {"user": "carol", "processInstanceUuid": "shared", "data": "shared+carol"},
        {"broadcast": True, "data": "everyone"},
    ]
    for envelope in envelopes:
        await gateway.produce(envelope, key="one-partition")
    try:
        assert datas(await alice.events(5)) == ["alice", "shared", "shared+alice", "alice-only", "everyone"]
        assert datas(await bob.events(4)) == ["bob", "shared", "shared+bob", "everyone"]
        assert datas(await carol.events(1)) == ["everyone"]
        # Nothing more arrives for anyone: a marker event sent last is each stream's next event.
        for user in ("alice", "bob", "carol"):
            await gateway.produce({"user": user, "data": "end"}, key="one-partition")
        for stream in (alice, bob, carol):
            assert datas(await stream.events(1)) == ["end"]
    finally:
        for stream in (alice, bob, carol):
            await stream.close()


async def test_view_all_permission_and_connect_records_grant_process_instances(gateway: Gateway) -> None:
    cookie = await session_cookie("auditor", view_all=True)
    async with await open_stream(gateway.url, headers=cookie, params=[("processInstanceUuid", "any-pi")]) as s:
        assert s.status == 200
        await gateway.produce({"processInstanceUuid": "any-pi", "data": 1})
        assert datas(await s.events(1)) == [1]
    refused = await open_stream(gateway.url, token=token("dan"), params=[("processInstanceUuid", "pi-d")])
    assert refused.status == 403
    await refused.close()
    await gateway.produce({"type": "connect", "user": "dan", "processInstanceUuid": "pi-d"})
    for _ in range(100):
        allowed = await open_stream(gateway.url, token=token("dan"), params=[("processInstanceUuid", "pi-d")])
        if allowed.status == 200:
            break
        await allowed.close()
        await asyncio.sleep(0.1)
    async with allowed:
        assert allowed.status == 200


async def test_disconnect_ends_delivery_of_that_instance_with_unsubscribed(gateway: Gateway) -> None:
    await grant("erin", "p1")
    await grant("erin", "p2")
    params = [("processInstanceUuid", "p1"), ("processInstanceUuid", "p2")]
    async with await open_stream(gateway.url, token=token("erin"), params=params) as stream:
        await gateway.produce({"processInstanceUuid": "p1", "data": "before"}, key="k")
        await gateway.produce({"type": "disconnect", "user": "erin", "processInstanceUuid": "p1"}, key="k")
        await gateway.produce({"processInstanceUuid": "p1", "data": "after"}, key="k")
        await gateway.produce({"processInstanceUuid": "p2", "data": "p2 still"}, key="k")
        got = await stream.events(3)
    assert [(e.event, e.json()) for e in got] == [
        ("message", got[0].json()),
        ("unsubscribed", {"processInstanceUuid": "p1"}),
        ("message", got[2].json()),
    ]
    assert datas([got[0], got[2]]) == ["before", "p2 still"]


# --- wire format ----------------------------------------------------------------------------------------
async def test_wire_format_headers_retry_ids_heartbeat_and_payloads(gateway: Gateway) -> None:
    async with await open_stream(gateway.url, token=token("fay")) as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        first = await stream.next_block()
        assert first is not None
        assert first.fields == [("retry", "3000")]
        position = await stream.next_block()
        assert position is not None
        assert [k for k, _ in position.fields] == ["id"]
        payload = {"text": "line one\nline two\r\n", "unicode": "żółć 🚀", "sse": "\n\ndata: injected"}
        await gateway.produce({"user": "fay", "event": "Task.Updated:v2", "data": payload})
        await gateway.produce({"user": "fay", "data": 2})
        one, two = await stream.events(2)
        assert one.event == "Task.Updated:v2"
        body = one.json()
        assert body["data"] == payload
        assert (body["user"], body["processInstanceUuid"], body["broadcast"]) == ("fay", None, False)
        assert datetime.fromisoformat(body["publishedAt"]).tzinfo is not None
        assert two.event == "message"
        assert parse_id(one.id or "") < parse_id(two.id or "")  # type: ignore[operator]
        # Idle: a ping comment within the heartbeat interval (2 s in the test deployment).
        block = await asyncio.wait_for(stream.next_block(), 5)
        assert block is not None
        assert block.fields == [("", "ping")]
    assert not any(line.startswith("data: injected") for line in stream.raw.decode().split("\n"))


# --- resume ---------------------------------------------------------------------------------------------
async def test_resume_replays_exactly_what_was_missed_in_order(gateway: Gateway) -> None:
    await grant("gil", "r1")
    await grant("gil", "r2")
    params = [("processInstanceUuid", "r1"), ("processInstanceUuid", "r2")]
    async with await open_stream(gateway.url, token=token("gil"), params=params) as stream:
        await gateway.produce({"user": "gil", "data": "seen-1"})
        await gateway.produce({"broadcast": True, "data": "seen-2"})
        seen = await stream.events(2)
    missed: list[dict[str, object]] = [
        {"user": "gil", "data": "m1"},
        {"processInstanceUuid": "r1", "data": "m2"},
        {"broadcast": True, "data": "m3"},
        {"processInstanceUuid": "r2", "user": "gil", "data": "m4"},
        {"user": "other", "data": "not for gil"},
        {"processInstanceUuid": "r2", "data": "m5"},
        {"processInstanceUuid": "r3", "data": "not followed"},
    ]
    for envelope in missed:
        await gateway.produce(envelope, key="same")
    # Same key, same partition: once the marker is delivered, everything before it is stored.
    async with await open_stream(gateway.url, token=token("marker")) as marker:
        await gateway.produce({"user": "marker", "data": "stored"}, key="same")
        await marker.events(1)
    async with await open_stream(
        gateway.url, token=token("gil"), params=params, headers={"Last-Event-ID": seen[-1].id or ""}
    ) as resumed:
        await gateway.produce({"user": "gil", "data": "live"}, key="same")
        got = await resumed.events(6)
    assert datas(got) == ["m1", "m2", "m3", "m4", "m5", "live"]
    ids = [e.id or "" for e in got]
    assert len(set(ids)) == 6
    # The same resume through the lastEventId query parameter.
    async with await open_stream(
        gateway.url, token=token("gil"), params=[*params, ("lastEventId", seen[-1].id or "")]
    ) as again:
        assert datas(await again.events(6)) == ["m1", "m2", "m3", "m4", "m5", "live"]


async def test_no_gap_and_no_duplicate_between_replay_and_live(gateway: Gateway) -> None:
    """Events keep arriving while streams disconnect and resume; the concatenation is complete."""
    total = 300
    received: list[SSEEvent] = []

    async def produce() -> None:
        for n in range(total):
            await gateway.produce({"user": "hal", "data": n}, key=f"k{n % 3}")
            await asyncio.sleep(0.005)

    # Start from a known position: a stream without Last-Event-ID begins at "now", so the first
    # position is taken before anything is produced.
    async with await open_stream(gateway.url, token=token("hal")) as first:
        await first.next_block()  # retry
        await first.next_block()  # id-only block: the stream's position
        last_id = first.last_event_id or ""
    assert last_id
    producer = asyncio.create_task(produce())
    try:
        while len(received) < total:
            async with await open_stream(gateway.url, token=token("hal"), headers={"Last-Event-ID": last_id}) as stream:
                assert stream.status == 200
                for _ in range(25):
                    if len(received) >= total:
                        break
                    event = await stream.next_event(timeout=20)
                    assert event is not None
                    received.append(event)
                last_id = stream.last_event_id or ""
        await producer
    finally:
        producer.cancel()
    assert sorted(datas(received)) == list(range(total))  # type: ignore[type-var]
    assert len({e.id for e in received}) == total


async def test_unknown_or_expired_last_event_id_starts_with_stream_reset(gateway: Gateway) -> None:
    for last in ("1-0", "garbage", "99999999999999-0"):
        async with await open_stream(gateway.url, token=token("ivy"), headers={"Last-Event-ID": last}) as stream:
            event = await stream.next_event()
            assert event is not None
            assert event.event == "stream-reset"
            await gateway.produce({"user": "ivy", "data": last})
            assert datas(await stream.events(1)) == [last]


async def test_bearer_stream_ends_at_token_expiry(gateway: Gateway) -> None:
    async with await open_stream(gateway.url, token=token("jay", ttl=3)) as stream:
        notice = await stream.next_event(timeout=15)  # EVENTS_TOKEN_RENEW_SECONDS (60) exceeds the 3 s left
        assert notice is not None
        assert notice.event == "token-expiring"
        event = await stream.next_event(timeout=15)
        assert event is not None
        assert event.event == "auth-expired"
        assert await stream.next_block() is None  # and the stream ends
