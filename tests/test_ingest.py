"""run_consumer end to end: Kafka records become durable, routed events; bad records are dead-lettered;
crashes, rebalances and a Redis outage lose nothing and store nothing twice."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import defaultdict
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition

from events.core import routing
from scripts.embedded import KafkaBroker, RedisServer
from subscriptions.models import Grant, RejectedRecord
from tests.harness import Gateway, Layout, token, wait_until
from tests.sse_client import open_stream

pytestmark = pytest.mark.django_db(transaction=True)


def stored(redis_url: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: Any = client.xrange(routing.EVENTS_STREAM)
        return [fields for _, fields in entries]
    finally:
        client.close()


def messages(redis_url: str) -> list[dict[str, str]]:
    return [e for e in stored(redis_url) if e["type"] == "message"]


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 20) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets, read without joining the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in partitions}
    finally:
        await consumer.stop()


async def test_accepted_events_are_stored_with_kafka_coordinates(gateway: Gateway, redis_server: RedisServer) -> None:
    partition, offset = await gateway.produce(
        {"user": "ada", "event": "Data", "data": {"n": 1}, "processInstanceUuid": "pi-ada"}
    )
    [entry] = await wait_until(lambda: messages(redis_server.url), what="the event in Redis")
    assert entry["user"] == "ada"
    assert entry["processInstanceUuid"] == "pi-ada"
    assert entry["event"] == "Data"
    assert json.loads(entry["data"]) == {"n": 1}
    assert entry["broadcast"] == "false"
    assert (entry["kafka_topic"], entry["kafka_partition"], entry["kafka_offset"]) == (
        gateway.topic,
        str(partition),
        str(offset),
    )
    assert entry["event_id"]
    assert int(entry["received_at"]) > 0


async def test_bad_records_go_to_the_dead_letter_topic_and_the_consumer_moves_on(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    bad = [
        (b"\xff\xfe", "not_utf8"),
        (b"{oops", "not_json"),
        (json.dumps({"data": 1}).encode(), "no_target"),
        (json.dumps({"user": "ada", "event": "bad name", "data": 1}).encode(), "bad_event"),
    ]
    for value, _ in bad:
        await gateway.produce(value, key="k-bad", headers=[("trace", b"t-1")])
    await gateway.produce({"user": "ada", "data": "after the bad ones"})

    await wait_until(lambda: messages(redis_server.url), what="the good record after the bad ones")
    dead = await read_topic(gateway.bootstrap, gateway.dlq, len(bad))
    assert [record.value for record in dead] == [value for value, _ in bad]
    for record, (_, reason) in zip(dead, bad, strict=True):
        headers = dict(record.headers)
        assert headers["x-gateway-error"].decode().startswith(reason + ": ")
        assert headers["trace"] == b"t-1"
        assert record.key == b"k-bad"
    reasons = [r async for r in RejectedRecord.objects.order_by("offset").values_list("reason", flat=True)]
    assert reasons == [reason for _, reason in bad]
    assert len(messages(redis_server.url)) == 1


async def test_connect_and_disconnect_create_and_end_grants(gateway: Gateway, redis_server: RedisServer) -> None:
    await gateway.produce({"type": "connect", "user": "ada", "processInstanceUuid": "pi-9"})
    await wait_until(
        lambda: Grant.objects.filter(user="ada", process_instance="pi-9", revoked_at__isnull=True).aexists(),
        what="the grant",
    )
    await gateway.produce({"type": "disconnect", "user": "ada", "processInstanceUuid": "pi-9"})
    await wait_until(
        lambda: Grant.objects.filter(user="ada", process_instance="pi-9", revoked_at__isnull=False).aexists(),
        what="the grant to end",
    )
    grant = await Grant.objects.aget(user="ada", process_instance="pi-9")
    assert grant.source == "kafka"
    assert grant.granted_by.startswith(f"kafka {gateway.topic}/")


async def test_producer_ids_deduplicate(gateway: Gateway, redis_server: RedisServer) -> None:
    for n in range(3):
        await gateway.produce({"user": "ada", "data": {"n": n}, "id": "same-id"})
    await gateway.produce({"user": "ada", "data": "other", "id": "other-id"})
    await wait_until(lambda: len(messages(redis_server.url)) == 2, what="two stored events")
    assert [json.loads(e["data"]) for e in messages(redis_server.url)] == [{"n": 0}, "other"]


async def test_sigterm_finishes_commits_and_exits_zero(gateway: Gateway, redis_server: RedisServer) -> None:
    for n in range(30):
        await gateway.produce({"user": f"u{n % 5}", "data": n})
    await wait_until(lambda: len(messages(redis_server.url)) == 30, what="30 stored events")
    proc, _ = gateway.consumers[0]
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 10) == 0
    assert time.monotonic() - started < 10
    offsets = await committed(gateway.bootstrap, gateway.env["KAFKA_GROUP_ID"], gateway.topic)
    assert sum(offsets.values()) == 30


@pytest.mark.slow
async def test_kill_9_at_random_points_loses_nothing_and_stores_nothing_twice(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    """A producer runs while the consumer is killed -9 three times; every event is stored once, in
    per-key order, and a stream connected throughout receives each exactly once."""
    total, keys = 450, [f"key-{k}" for k in range(6)]
    rng = random.Random(7)
    received: list[Any] = []

    # Connected before the first record is produced: a stream that opens later starts after what was stored
    # before it (the response headers arrive once it is registered), and would never see all of them.
    stream = await open_stream(gateway.url, token=token("kim"))
    assert stream.status == 200

    async def listen() -> None:
        async with stream:
            while len(received) < total:
                event = await stream.next_event(timeout=120)
                assert event is not None
                received.append(event)

    async def produce() -> None:
        seq: dict[str, int] = defaultdict(int)
        for _ in range(total):
            key = rng.choice(keys)
            await gateway.produce({"user": "kim", "data": {"key": key, "seq": seq[key]}}, key=key)
            seq[key] += 1
            await asyncio.sleep(0.02)

    listener = asyncio.create_task(listen())
    producer = asyncio.create_task(produce())
    try:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            proc, _ = gateway.consumers[-1]
            proc.signal(signal.SIGKILL)
            await asyncio.to_thread(proc.proc.wait)
            await gateway.start_consumer(wait=False)
        await producer
        await wait_until(lambda: len(messages(redis_server.url)) >= total, timeout=90, what="every event stored")
        await asyncio.wait_for(listener, 60)
    finally:
        for task in (listener, producer):
            task.cancel()
        await asyncio.gather(listener, producer, return_exceptions=True)

    def check(sequence: list[dict[str, Any]], what: str) -> None:
        pairs = [(d["key"], d["seq"]) for d in sequence]
        assert len(pairs) == total, f"{what}: {len(pairs)} events, expected {total}"
        assert len(set(pairs)) == total, f"{what}: duplicates"
        by_key: dict[str, list[int]] = defaultdict(list)
        for key, n in pairs:
            by_key[key].append(n)
        for key, seqs in by_key.items():
            assert seqs == list(range(len(seqs))), f"{what}: {key} out of order or with gaps"

    check([json.loads(e["data"]) for e in messages(redis_server.url)], "store")
    check([e.json()["data"] for e in received], "stream")
    ids = [e.id for e in received]
    assert len(set(ids)) == total


async def test_redis_outage_stops_the_consumer_without_committing_and_it_resumes(
    kafka: KafkaBroker, db_url: str
) -> None:
    server = RedisServer().start()
    layout = Layout(webs=0, partitions=1)
    gateway = Gateway(bootstrap=kafka.bootstrap, redis_url=server.url, database_url=db_url, layout=layout)
    try:
        await gateway.start()
        await gateway.produce({"user": "ada", "data": "before"})
        await wait_until(lambda: len(messages(server.url)) == 1, what="the first event")
        group = gateway.env["KAFKA_GROUP_ID"]
        await wait_until(lambda: _sum_committed(gateway, group, 1), what="the first commit")

        server.stop()
        for n in range(5):
            await gateway.produce({"user": "ada", "data": {"during": n}})
        proc, _ = gateway.consumers[0]
        # Several failed retries in, nothing beyond the first record may have been committed.
        await wait_until(lambda: proc.log().count("unavailable") >= 3, what="the consumer to retry")
        assert sum((await committed(gateway.bootstrap, group, gateway.topic)).values()) == 1
        assert proc.proc.poll() is None

        server.start()  # same port, empty: what was stored before the outage is gone, the rest arrives
        await wait_until(lambda: len(messages(server.url)) == 5, timeout=30, what="the events from the outage")
        assert [json.loads(e["data"]) for e in messages(server.url)] == [{"during": n} for n in range(5)]
        await wait_until(lambda: _sum_committed(gateway, group, 6), what="the commit after the outage")
    finally:
        await gateway.stop()
        server.stop()


async def _sum_committed(gateway: Gateway, group: str, expected: int) -> bool:
    return sum((await committed(gateway.bootstrap, group, gateway.topic)).values()) == expected
