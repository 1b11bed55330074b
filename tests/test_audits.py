"""What admins audit: each delivery on each stream, broadcasts once per web process, replays, drops,
streams opened and closed, written by the consumer from what the web processes hand over."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from asgiref.sync import sync_to_async

from scripts.embedded import KafkaBroker, RedisServer
from subscriptions import selectors
from subscriptions.models import BroadcastDelivery, DeliveryAudit, Grant, Subscription
from tests.harness import Gateway, Layout, running, token, wait_until
from tests.sse_client import open_stream

pytestmark = pytest.mark.django_db(transaction=True)


async def test_deliveries_broadcasts_and_replays_are_audited(gateway: Gateway) -> None:
    await Grant.objects.acreate(
        user="aud-1", process_instance="aud-pi", granted_at=datetime.now(UTC), granted_by="test", source="admin"
    )
    one = await open_stream(gateway.url, token=token("aud-1"), params=[("processInstanceUuid", "aud-pi")])
    two = await open_stream(gateway.url, token=token("aud-2"))
    await gateway.produce({"user": "aud-1", "event": "Mine", "data": 1}, key="k")
    await gateway.produce({"processInstanceUuid": "aud-pi", "event": "Process", "data": 2}, key="k")
    await gateway.produce({"broadcast": True, "event": "All", "data": 3}, key="k")
    mine, process, everyone = await one.events(3)
    [everyone_two] = await two.events(1)
    await one.close()
    await two.close()

    rows = await wait_until(
        lambda: _list(DeliveryAudit.objects.filter(subscription__user="aud-1").order_by("sent_at", "id")),
        what="the delivery rows",
    )
    assert [(r.event_id, r.event, r.status) for r in rows] == [
        (mine.id, "Mine", "delivered"),
        (process.id, "Process", "delivered"),
    ]
    assert rows[0].user == "aud-1"
    assert rows[1].process_instance == "aud-pi"
    assert rows[0].kafka_topic == gateway.topic
    assert rows[0].kafka_offset is not None
    assert rows[0].latency_ms is not None
    assert rows[0].latency_ms >= 0

    [broadcast] = await wait_until(
        lambda: _list(BroadcastDelivery.objects.filter(event_id=everyone.id)), what="the broadcast row"
    )
    assert everyone_two.id == everyone.id
    assert broadcast.streams == 2
    assert broadcast.event == "All"
    recipients = await wait_until(lambda: recipients_of(everyone.id or ""), what="both streams recorded")
    assert recipients == ["aud-1", "aud-2"]
    closed = await wait_until(
        lambda: _list(Subscription.objects.filter(user="aud-1", closed_at__isnull=False)), what="the closed stream"
    )
    assert closed[0].events_delivered == 3
    assert closed[0].last_event_id == everyone.id
    assert closed[0].close_reason == Subscription.CloseReason.CLIENT_GONE

    # A stream opened after the broadcast did not receive it; one resuming from before did, as a replay.
    async with await open_stream(gateway.url, token=token("aud-3")) as late:
        await late.next_block()
        async with await open_stream(
            gateway.url, token=token("aud-2"), headers={"Last-Event-ID": mine.id or ""}
        ) as resumed:
            assert [e.id for e in await resumed.events(1)] == [everyone.id]
    replayed = await wait_until(
        lambda: _list(DeliveryAudit.objects.filter(event_id=everyone.id, status="replayed")), what="the replay"
    )
    assert len(replayed) == 1
    await wait_until(
        lambda: Subscription.objects.filter(user="aud-3", closed_at__isnull=False).aexists(), what="aud-3 closed"
    )
    assert await recipients_of(everyone.id or "") == ["aud-1", "aud-2"]


@sync_to_async
def recipients_of(event_id: str) -> list[str]:
    return [s.user for s in selectors.broadcast_recipients(event_id=event_id).order_by("user")]


async def _list(queryset: object) -> list[object]:
    return [row async for row in queryset]  # type: ignore[attr-defined]


async def test_audits_off_keeps_streams_but_no_deliveries(
    kafka: KafkaBroker, redis_server: RedisServer, db_url: str
) -> None:
    layout = Layout(env={"AUDIT_DELIVERIES": "off"})
    async with running(bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url, layout=layout) as gw:
        async with await open_stream(gw.url, token=token("quiet")) as stream:
            await gw.produce({"user": "quiet", "data": 1})
            await gw.produce({"broadcast": True, "data": 2})
            await stream.events(2)
        sub = await wait_until(
            lambda: Subscription.objects.filter(user="quiet", closed_at__isnull=False).afirst(), what="the stream row"
        )
        assert sub.events_delivered == 2
        assert not await DeliveryAudit.objects.filter(subscription=sub).aexists()
        assert not await BroadcastDelivery.objects.aexists()
