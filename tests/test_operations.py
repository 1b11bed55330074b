"""What operators rely on: health, readiness, metrics that move by the right amounts, JSON logs,
graceful shutdown of web processes, and a Redis outage that never turns into a 5xx for browsers."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from scripts.embedded import KafkaBroker, RedisServer
from subscriptions.models import Subscription
from tests.harness import Gateway, Layout, running, token, wait_until
from tests.sse_client import open_stream
from tests.test_streams_at_scale import metric

pytestmark = pytest.mark.django_db(transaction=True)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest_asyncio.fixture
async def json_gateway(kafka: KafkaBroker, redis_server: RedisServer, db_url: str) -> AsyncIterator[Gateway]:
    layout = Layout(env={"LOG_FORMAT": "json"})
    async with running(bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url, layout=layout) as gw:
        yield gw


async def test_metrics_count_what_happened(json_gateway: Gateway) -> None:
    gw = json_gateway
    consumer = f"http://127.0.0.1:{gw.consumers[0][1]}"
    topic = f'{{topic="{gw.topic}",type="message"}}'
    async with await open_stream(gw.url, token=token("m-a")) as a, await open_stream(gw.url, token=token("m-b")) as b:
        assert metric(gw.url, "gateway_open_streams") == 2
        for n in range(5):
            await gw.produce({"user": "m-a", "data": n})
        for n in range(3):
            await gw.produce({"broadcast": True, "data": n})
        await gw.produce(b"{not json")
        await gw.produce(b"[]")
        await a.events(8)
        await b.events(3)
        await wait_until(lambda: metric(consumer, "gateway_events_consumed_total", topic) == 8, what="consumed")
        # The bad records may sit in another partition than the good ones, fetched in a later batch.
        for reason in ("not_json", "not_object"):
            labels = f'{{reason="{reason}",topic="{gw.topic}"}}'

            def rejected_once(labels: str = labels) -> bool:
                return metric(consumer, "gateway_events_rejected_total", labels) == 1

            await wait_until(rejected_once, what=reason)
        assert metric(consumer, "gateway_consumer_lag", f'{{partition="0",topic="{gw.topic}"}}') >= 0
        await wait_until(
            lambda: metric(gw.url, "gateway_deliveries_total", '{status="delivered"}') == 11, what="deliveries"
        )
        assert metric(gw.url, "gateway_delivery_latency_seconds_count") == 11
    await wait_until(lambda: metric(gw.url, "gateway_open_streams") == 0, what="streams to close")

    # One JSON object per line, with the record's coordinates and no payload.
    lines = [line for line in gw.consumers[0][0].log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    rejected = [e for e in entries if e["message"] == "record rejected"]
    assert sorted(e["reason"] for e in rejected) == ["not_json", "not_object"]
    assert {"topic", "partition", "offset"} <= rejected[0].keys()
    assert all("{not json" not in line for line in lines)
    for line in gw.webs[0][0].log().splitlines():
        if line.strip():
            json.loads(line)


async def test_health_and_readiness_follow_redis(gateway: Gateway, redis_server: RedisServer) -> None:
    assert get(gateway.url + "/healthz")[0] == 200
    status, body = get(gateway.url + "/readyz")
    assert (status, json.loads(body)) == (200, {"redis": True, "database": True})
    consumer = f"http://127.0.0.1:{gateway.consumers[0][1]}"
    assert get(consumer + "/healthz")[0] == 200
    assert json.loads(get(consumer + "/readyz")[1])["kafka"] is True

    async with await open_stream(gateway.url, token=token("r")) as stream:
        await stream.next_block()
        redis_server.stop()
        status, body = get(gateway.url + "/readyz")
        assert (status, json.loads(body)["redis"]) == (503, False)
        assert get(consumer + "/readyz")[0] == 503
        # A browser that connects now is told to retry later, not given a 5xx that would stop it for good.
        async with await open_stream(gateway.url, token=token("r2")) as refused:
            assert refused.status == 200
            first = await refused.next_block()
            assert first is not None
            assert first.get("retry") == "3000"
            assert await refused.next_block() is not None  # the comment saying why
            assert await refused.next_block() is None  # then it closes
        redis_server.start()
        await wait_until(lambda: get(gateway.url + "/readyz")[0] == 200, what="ready again")
        # The stream that stayed open still gets events once Redis is back.
        await gateway.produce({"user": "r", "data": "after"})
        event = await stream.next_event(timeout=30)
        assert event is not None
        assert event.json()["data"] == "after"


async def test_sigterm_closes_streams_with_retry_and_flushes_audits(gateway: Gateway) -> None:
    async with await open_stream(gateway.url, token=token("bye")) as stream:
        await gateway.produce({"user": "bye", "data": 1})
        await stream.events(1)
        proc, _ = gateway.webs[0]
        proc.signal(signal.SIGTERM)
        last = None
        while (block := await stream.next_block()) is not None:
            last = block
        assert last is not None
        assert last.get("retry") == "3000"
    assert await asyncio.to_thread(proc.proc.wait, 15) == 0
    # The web process handed its last audits to Redis before exiting; the consumer writes them.
    sub = await wait_until(
        lambda: Subscription.objects.filter(user="bye", closed_at__isnull=False).afirst(), what="the stream's row"
    )
    assert sub.close_reason == Subscription.CloseReason.SHUTDOWN
    assert sub.events_delivered == 1
    assert await sub.deliveries.filter(status="delivered").acount() == 1
