"""The consumer and the web process survive what producers and backends do to them, through the real
broker, Redis and processes: hostile records, repeated producer ids, a Redis stall with a rebalance in the
middle of a batch, a dead audit writer, a stored entry no web process can read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis

from events.core import routing
from scripts.embedded import KafkaBroker, RedisServer
from subscriptions.models import Grant, RejectedRecord
from tests.harness import Consumer, Gateway, Layout, http_get, token, wait_until
from tests.sse_client import open_stream
from tests.test_ingest import messages, read_topic

# The database is used here as the other end-to-end tests use it: the PostgreSQL pass leaves these out.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.incidental_db]

HOSTILE: list[tuple[bytes, str]] = [
    (b"[" * 100_000, "too_deep"),
    (b'{"user":"ana","data":' + b"9" * 5000 + b"}", "bad_number"),
    (b'{"user":"ana","data":{"x":NaN}}', "bad_number"),
    (b'{"user":"ana","data":[1e999]}', "bad_number"),
    (b'{"user":"ana","data":"\\ud800"}', "bad_string"),
    (b'{"user":"ana","user":"bob","data":1}', "duplicate_key"),
    (b'{"user":"ana","id":"x\\u0000y","data":1}', "bad_id"),
    (b'{"user":"\\u0000","data":1}', "bad_user"),
    (b'{"user":"ana","event":"a\\nb","data":1}', "bad_event"),
    (b'{"user":["ana"],"data":1}', "bad_user"),
    (b"null", "not_object"),
    (b"", "empty"),
    (b"\xc3\x28", "not_utf8"),
]


async def metric(port: int, name: str) -> float:
    """The sum of a metric's samples on a process's /metrics (0 when absent)."""
    _, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _web_port(gateway: Gateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


async def test_a_batch_of_hostile_records_is_dead_lettered_and_the_next_event_arrives(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    stream = await open_stream(gateway.url, token=token("ana"))
    producer = await gateway.producer()
    for value, _ in HOSTILE:
        await producer.send_and_wait(gateway.topic, value, key=b"k", headers=[("trace", None), ("\x00k", b"\x00")])
    # A valid event whose record timestamp is in microseconds: delivered, published at its receive time.
    micro = int(time.time() * 1_000_000)
    await producer.send_and_wait(gateway.topic, b'{"user":"ana","data":"micro"}', key=b"k", timestamp_ms=micro)
    await gateway.produce({"user": "ana", "event": "After", "data": {"ok": True}}, key="k")

    micro_event, after = await stream.events(2, timeout=60)
    assert micro_event.json()["data"] == "micro"
    published = micro_event.json()["publishedAt"]
    assert published.startswith(time.strftime("%Y-", time.gmtime()))
    assert (after.event, after.json()["data"]) == ("After", {"ok": True})
    await stream.close()

    dead = await read_topic(gateway.bootstrap, gateway.dlq, len(HOSTILE), timeout=30)
    assert len(dead) == len(HOSTILE)
    for record, (value, reason) in zip(dead, HOSTILE, strict=True):
        headers = dict(record.headers)
        assert headers["x-gateway-error"].decode().startswith(reason + ": "), headers["x-gateway-error"]
        assert record.value == value
    rows = [r async for r in RejectedRecord.objects.order_by("offset").values_list("reason", "headers")]
    assert [reason for reason, _ in rows] == [reason for _, reason in HOSTILE]
    assert rows[0][1] == [["trace", None], ["\ufffdk", "\ufffd"]]

    consumer = gateway.consumers[0]
    assert consumer.proc.running
    status, body = await http_get(f"http://127.0.0.1:{consumer.port}/readyz")
    assert status == 200, body
    assert [json.loads(e["data"]) for e in messages(redis_server.url)] == ["micro", {"ok": True}]


async def test_a_repeated_producer_id_changes_nothing_connect_and_disconnect_included(gateway: Gateway) -> None:
    connect = {"type": "connect", "user": "ana", "processInstanceUuid": "pi-r", "id": "grant-1"}
    await gateway.produce(connect)
    await gateway.produce({"type": "disconnect", "user": "ana", "processInstanceUuid": "pi-r", "id": "revoke-1"})
    await wait_until(
        lambda: Grant.objects.filter(user="ana", process_instance="pi-r", revoked_at__isnull=False).aexists(),
        what="the grant, then its end",
    )
    # The same connect again (a producer's retry): the grant stays ended. A new id applies.
    await gateway.produce(connect)
    await gateway.produce({"type": "connect", "user": "ana", "processInstanceUuid": "pi-other", "id": "grant-2"})
    await wait_until(lambda: Grant.objects.filter(process_instance="pi-other").aexists(), what="the later grant")
    assert await Grant.objects.filter(process_instance="pi-r").acount() == 1
    assert not await Grant.objects.filter(process_instance="pi-r", revoked_at__isnull=True).aexists()


async def _acl(url: str, *rules: str) -> None:
    client = aioredis.from_url(url)
    try:
        await client.execute_command("ACL", "SETUSER", "default", *rules)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def scripts_refused(url: str) -> AsyncIterator[None]:
    """While inside, Redis refuses the event store's script (appends fail, reads work); accepted again after."""
    await _acl(url, "-evalsha", "-eval")
    try:
        yield
    finally:
        await _acl(url, "+@all")


async def test_a_batch_retried_after_a_redis_failure_dead_letters_each_record_once(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    consumer = gateway.consumers[0]
    async with scripts_refused(redis_server.url):
        await gateway.produce(b"{not json", key="k")
        await gateway.produce({"user": "ana", "data": "kept"}, key="k")
        await wait_until(lambda: consumer.proc.log().count("retrying in") >= 3, timeout=60, what="retries")
    await wait_until(lambda: messages(redis_server.url), timeout=60, what="the batch to be stored")
    await asyncio.sleep(2)  # a duplicate copy would have been sent by now
    dead = await read_topic(gateway.bootstrap, gateway.dlq, 2, timeout=5)
    assert [record.value for record in dead] == [b"{not json"]
    assert await RejectedRecord.objects.acount() == 1


@pytest.mark.slow
async def test_a_rebalance_during_a_redis_stall_does_not_crash_the_consumer(kafka: KafkaBroker, db_url: str) -> None:
    """Consumer A holds a batch it cannot store; B joins and takes partitions from A; when Redis accepts
    writes again, A finishes its batch and commits only what is still its own. Nothing is lost or doubled."""
    with RedisServer() as server:
        layout = Layout(webs=1, consumers=1, partitions=4)
        gateway = Gateway(bootstrap=kafka.bootstrap, redis_url=server.url, database_url=db_url, layout=layout)
        try:
            await gateway.start()
            stream = await open_stream(gateway.url, token=token("reb"))
            first = gateway.consumers[0]
            async with scripts_refused(server.url):
                for n in range(40):
                    await gateway.produce({"user": "reb", "data": n}, key=f"k{n % 8}")
                await wait_until(lambda: first.proc.log().count("retrying in") >= 2, timeout=60, what="A retries")
                await gateway.start_consumer(wait=False)
                second = gateway.consumers[1]
                # Not A's "partitions revoked" log line: aiokafka calls the listener at the first join too.
                await wait_until(
                    lambda: _rebalanced(first, second),
                    timeout=90,
                    what="the rebalance",
                    watch=[first.proc, second.proc],
                    ignore=(OSError,),
                )
            await wait_until(
                lambda: len(messages(server.url)) >= 40, timeout=90, what="every event stored", watch=[first.proc]
            )
            received = await stream.events(40, timeout=60)
            assert sorted(e.json()["data"] for e in received) == list(range(40))
            assert len(messages(server.url)) == 40
            await asyncio.sleep(1)
            for consumer in (first, second):
                assert consumer.proc.running, consumer.proc.log_tail()
            for failure in ("IllegalStateError", "task failed", "storing a batch failed"):
                assert failure not in first.proc.log()

            async def lag_labels_follow_assignment() -> bool:
                """Each consumer reports lag for the partitions it owns now, none for those it gave up."""
                for consumer in (first, second):
                    _, ready = await http_get(f"http://127.0.0.1:{consumer.port}/readyz")
                    _, body = await http_get(f"http://127.0.0.1:{consumer.port}/metrics")
                    labels = [line for line in body.splitlines() if line.startswith("gateway_consumer_lag{")]
                    if len(labels) != json.loads(ready)["assigned_partitions"]:
                        return False
                return True

            await wait_until(lag_labels_follow_assignment, timeout=30, what="lag labels to follow the assignment")
            await stream.close()
        finally:
            await gateway.stop()


async def _assigned(consumer: Consumer) -> int:
    """How many partitions `consumer` owns, as its /readyz says; OSError while it is not listening yet."""
    status, body = await http_get(f"http://127.0.0.1:{consumer.port}/readyz")
    assert status in (200, 503), (status, body)
    return int(json.loads(body)["assigned_partitions"])


async def _rebalanced(first: Consumer, second: Consumer) -> bool:
    """The second consumer has taken partitions from the first."""
    return await _assigned(second) > 0 and await _assigned(first) < 4


async def test_lag_climbs_while_redis_refuses_writes_and_falls_after(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    consumer = gateway.consumers[0]
    async with scripts_refused(redis_server.url):
        for n in range(12):
            await gateway.produce({"user": "lag", "data": n}, key=f"k{n}")

        async def lag_at_least(n: float) -> bool:
            return await metric(consumer.port, "gateway_consumer_lag{") >= n

        await wait_until(lambda: lag_at_least(11), timeout=40, what="the lag to climb")

    async def no_lag() -> bool:
        return await metric(consumer.port, "gateway_consumer_lag{") == 0

    await wait_until(no_lag, timeout=40, what="the lag to fall")


async def test_readiness_says_when_the_audit_writer_is_not_running(gateway: Gateway) -> None:
    consumer = gateway.consumers[0]
    stream = await open_stream(gateway.url, token=token("aw"))
    await gateway.produce({"user": "aw", "data": 1})
    await stream.events(1, timeout=30)
    await stream.close()

    async def written() -> bool:
        return await metric(consumer.port, "gateway_audit_batches_written_total") >= 1

    await wait_until(written, timeout=30, what="the audit writer child's figures on the consumer's /metrics")

    [child] = [
        child
        for child in psutil.Process(consumer.proc.pid).children()
        if "spawn_main" in " ".join(child.cmdline())  # not multiprocessing's resource tracker
    ]
    child.send_signal(signal.SIGKILL)

    async def readiness() -> tuple[int, Any]:
        status, body = await http_get(f"http://127.0.0.1:{consumer.port}/readyz")
        return status, json.loads(body)

    async def not_ready() -> bool:
        status, body = await readiness()
        return status == 503 and body["audit_writer"] is False

    await wait_until(not_ready, timeout=10, interval=0.05, what="readiness to turn false")

    async def ready_again() -> bool:
        return (await readiness())[0] == 200

    await wait_until(ready_again, timeout=30, what="the audit writer to be restarted")
    assert await metric(consumer.port, "gateway_audit_writer_restarts_total") == 1


async def test_an_unreadable_stored_entry_is_skipped_and_delivery_goes_on(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    stream = await open_stream(gateway.url, token=token("skip"))
    await gateway.produce({"user": "skip", "data": "before"})
    [before] = await stream.events(1, timeout=30)

    # Something else writes a damaged entry into the user's stream and its live channel.
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        last: Any = await client.get(routing.LAST_ID_KEY)
        ms, seq = (int(part) for part in last.split("-"))
        bad_id = f"{ms}-{seq + 1}"
        await client.xadd(routing.user_source("skip"), {"e": "not packed"}, id=bad_id)
        await client.set(routing.LAST_ID_KEY, bad_id)
        await client.publish(routing.user_source("skip"), f"{bad_id} not packed")
        await client.publish(routing.user_source("skip"), "no id at all")
    finally:
        await client.aclose()
    await gateway.produce({"user": "skip", "data": "after"})
    [after] = await stream.events(1, timeout=30)
    assert after.json()["data"] == "after"
    assert before.id is not None
    assert after.id is not None
    assert after.id > before.id
    await stream.close()
    # A replay over the damaged entry skips it too.
    async with await open_stream(gateway.url, token=token("skip"), headers={"Last-Event-ID": before.id}) as again:
        [replayed] = await again.events(1, timeout=30)
        assert replayed.json()["data"] == "after"

    port = _web_port(gateway)
    assert await metric(port, 'gateway_task_failures_total{task="hub-feed"}') >= 2
    status, body = await http_get(gateway.url + "/readyz")
    assert status == 200, body
    assert json.loads(body)["delivery"] is True
