"""`manage.py replay_dead_letters`: re-produce dead-lettered records to the topic they came from, once each.

A dead letter carries `x-gateway-source` (`topic/partition/offset`) and `x-gateway-error` (`reason: detail`),
events/ingest/dead_letters.py. Replayed, it goes back to its source topic with its key, value and the
producer's headers, plus `x-gateway-replayed-from` naming the dead letter, and the consumer judges it anew.

Once: before a record is sent, a marker is claimed in Redis (SET NX) under the dead letter's coordinates;
a second run, or a run racing this one, skips it. A marker left "sending" (the run died between claiming and
the broker's acknowledgement) is reported and not retried: at most once, never twice. A dead letter that is
itself a failed replay (it carries `x-gateway-replayed-from`) is skipped: the producer's record is still bad.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.structs import ConsumerRecord

from events.core import routing, sse
from events.ingest.kafka import kafka_options

MARKER_PREFIX = f"{routing.PREFIX}:dlq-replayed:"
# How long a marker outlives its replay: longer than a dead-letter topic keeps records (Kafka's default is
# 7 days), so a record still in the topic is never replayed twice.
MARKER_SECONDS = 30 * 86_400
GATEWAY_HEADERS = ("x-gateway-error", "x-gateway-source", "x-gateway-value-dropped", "x-gateway-replayed-from")
REPLAYED_FROM = "x-gateway-replayed-from"
FETCH_MS = 1000


class ReplayFailed(RuntimeError):
    pass


@dataclass
class ReplayResult:
    """What a run did: counts by outcome (replayed, would replay, already replayed, ...)."""

    read: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


def _header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return value.decode("utf-8", "replace") if value is not None else ""
    return None


def marker_key(topic: str, partition: int, offset: int) -> str:
    return f"{MARKER_PREFIX}{topic}/{partition}/{offset}"


async def dead_letters_replay(
    *,
    dlq_topic: str,
    redis_url: str,
    since_ms: int | None,
    reasons: frozenset[str],
    dry_run: bool,
    write: Callable[[str], None],
) -> ReplayResult:
    """Replay the dead letters of `dlq_topic` written at or after `since_ms` (None: all it holds) whose reason
    is in `reasons` (empty: any), up to the topic's end when the run starts."""
    result = ReplayResult()
    client = aioredis.from_url(redis_url)
    consumer = AIOKafkaConsumer(**kafka_options(), group_id=None, enable_auto_commit=False)
    producer = AIOKafkaProducer(**kafka_options(), acks="all")
    try:
        await consumer.start()
        partitions = consumer.partitions_for_topic(dlq_topic)
        if not partitions:
            await consumer.topics()  # refresh metadata once: the topic may be new to this client
            partitions = consumer.partitions_for_topic(dlq_topic)
        if not partitions:
            raise ReplayFailed(f"the dead-letter topic {dlq_topic!r} does not exist")
        tps = [TopicPartition(dlq_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        if since_ms is not None:
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            starts = {tp: found[tp].offset if found[tp] is not None else ends[tp] for tp in tps}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        total = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        write(f"{dlq_topic}: {total} dead letters to read in {len(tps)} partition(s)")
        if not dry_run:
            await producer.start()
        pending = {tp for tp in tps if starts[tp] < ends[tp]}
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=FETCH_MS)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    result.read += 1
                    outcome = await _one(record, client, producer, reasons=reasons, dry_run=dry_run, write=write)
                    result.outcomes[outcome] += 1
                    if result.read % 100 == 0:
                        write(f"... {result.read}/{total} read: {_summary(result)}")
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        write(f"done: {result.read} read: {_summary(result)}")
        return result
    finally:
        await consumer.stop()
        await producer.stop()
        await client.aclose()


def _summary(result: ReplayResult) -> str:
    return ", ".join(f"{count} {outcome}" for outcome, count in sorted(result.outcomes.items())) or "nothing"


async def _one(
    record: ConsumerRecord[bytes, bytes],
    client: aioredis.Redis,
    producer: AIOKafkaProducer,
    *,
    reasons: frozenset[str],
    dry_run: bool,
    write: Callable[[str], None],
) -> str:
    here = f"{record.topic}/{record.partition}/{record.offset}"
    error = _header(record, "x-gateway-error") or ""
    reason = error.split(":", 1)[0]
    if reasons and reason not in reasons:
        return "other reason"
    source = _header(record, "x-gateway-source") or ""
    topic, _, _ = source.rpartition("/")[0].rpartition("/")
    if not topic:
        write(sse.clean(f"{here}: no x-gateway-source header, skipped"))
        return "not a dead letter"
    if _header(record, "x-gateway-value-dropped") is not None:
        write(sse.clean(f"{here}: its value was dropped (too large for the dead-letter topic), skipped"))
        return "value dropped"
    if _header(record, REPLAYED_FROM) is not None:
        return "failed replay"
    key = marker_key(record.topic, record.partition, record.offset)
    marked = await client.get(key)
    if marked is not None:
        if (marked.decode() if isinstance(marked, bytes) else marked).startswith("sending"):
            write(sse.clean(f"{here}: a run claimed it and did not confirm sending it; check {topic} by hand"))
            return "uncertain"
        return "already replayed"
    if dry_run:
        write(sse.clean(f"{here} ({error[:120]}) would go back to {source}"))
        return "would replay"
    if not await client.set(key, f"sending since {int(time.time())}", nx=True, ex=MARKER_SECONDS):
        return "already replayed"
    headers = [(k, v) for k, v in record.headers if k not in GATEWAY_HEADERS]
    headers.append((REPLAYED_FROM, here.encode()))
    try:
        meta = await producer.send_and_wait(topic, value=record.value, key=record.key, headers=headers)
    except KafkaError as exc:
        # Refused for sure: the next run may try again. A timeout may have been written: the marker stays.
        if not isinstance(exc, KafkaTimeoutError):
            await client.delete(key)
        raise
    sent = f"{meta.topic}/{meta.partition}/{meta.offset}"
    await client.set(key, f"replayed as {sent} at {int(time.time())}", ex=MARKER_SECONDS)
    write(sse.clean(f"{here} ({reason}) replayed as {sent}"))
    return "replayed"
