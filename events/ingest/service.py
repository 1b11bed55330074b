"""The consumer service: Kafka batches -> validation -> Redis (durable) -> announcement -> commit.

Invariants:
- An offset is committed only after every record up to it is durable in Redis (or dead-lettered).
- A record re-read after a crash or a rebalance is recognised by its offset (recorded in Redis in the
  same atomic step as the event) and neither stored nor dead-lettered twice.
- A backing service that fails (Redis, the database, the DLQ producer) stops fetching; the batch is
  retried with backoff until it succeeds or the service is asked to stop, and nothing is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError, close_old_connections

from events.core import envelope, routing
from events.core.records import Record
from events.core.store import EventStore
from events.ingest import dead_letters
from events.ingest.kafka import kafka_options
from events.ops import metrics
from subscriptions import services

logger = logging.getLogger(__name__)

MAX_BATCH = 5000
# How long a fetch waits for records; an idle consumer wakes this often to check for a stop request.
FETCH_WAIT_MS = 500
# How long the broker may hold a fetch open when it has nothing: it bounds the latency an idle topic adds
# (brokers that do not answer early when records arrive made the 500 ms default cost ~120 ms a record).
BROKER_WAIT_MS = 10

Message: TypeAlias = ConsumerRecord[bytes, bytes]
Batch: TypeAlias = dict[TopicPartition, list[Message]]
# Backoff while a backing service is down: start fast (a blip), settle at 5 s (a restart).
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0


class _Rebalance(ConsumerRebalanceListener):
    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Batches are committed before the next fetch, so nothing is pending here; a batch in hand
        # whose partitions move is re-read by the new owner and recognised by its stored offsets.
        logger.info("partitions revoked", extra={"partitions": sorted(str(tp) for tp in revoked)})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        logger.info("partitions assigned", extra={"partitions": sorted(str(tp) for tp in assigned)})


class _Stopping(Exception):
    """Raised out of a retry loop when the service is asked to stop."""


class IngestService:
    """Consumes KAFKA_TOPICS into the event store. start() / run() / stop()."""

    def __init__(self, *, topics: Sequence[str] | None = None, group_id: str | None = None) -> None:
        self.topics = list(topics or settings.KAFKA_TOPICS)
        self.group_id = group_id or settings.KAFKA_GROUP_ID
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.redis: aioredis.Redis | None = None
        self.store: EventStore | None = None
        self._stop = asyncio.Event()
        self.ready = False

    async def start(self) -> None:
        self.redis = aioredis.from_url(settings.REDIS_URL, socket_timeout=10, socket_connect_timeout=5)
        self.store = EventStore(self.redis, retention_seconds=settings.EVENTS_RETENTION_SECONDS)
        self.producer = AIOKafkaProducer(**kafka_options(), acks="all", enable_idempotence=False)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            **kafka_options(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=BROKER_WAIT_MS,
            # How long the group waits for a silent consumer before handing its partitions on.
            session_timeout_ms=settings.KAFKA_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=min(3000, settings.KAFKA_SESSION_TIMEOUT_MS // 3),
        )
        self.consumer.subscribe(self.topics, listener=_Rebalance())
        await self.consumer.start()
        self.ready = True
        logger.info("consumer started", extra={"topics": self.topics, "group": self.group_id})

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, and return from run()."""
        self._stop.set()

    async def stop(self) -> None:
        """Release every connection; safe to call more than once."""
        self.ready = False
        consumer, self.consumer = self.consumer, None
        producer, self.producer = self.producer, None
        client, self.redis = self.redis, None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()
        if client is not None:
            await client.aclose()

    async def run(self) -> None:
        """Consume until request_stop(); the service must be started.

        Two batches overlap: the next one is fetched and validated while the previous one is being made
        durable and committed. Batches are stored and committed strictly one after the other.
        """
        assert self.consumer is not None
        in_flight: asyncio.Task[None] | None = None
        try:
            while not self._stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=FETCH_WAIT_MS, max_records=MAX_BATCH)
                parsed = self._parse_batch(batch)
                if in_flight is not None:
                    await in_flight
                    in_flight = None
                if batch:
                    in_flight = asyncio.get_running_loop().create_task(self._complete(batch, parsed))
            if in_flight is not None:
                await in_flight
        except _Stopping:
            logger.warning("stopping with a batch not yet durable; it will be re-read")
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
                with contextlib.suppress(asyncio.CancelledError, _Stopping):
                    await in_flight

    def _parse_batch(self, batch: Batch) -> list[tuple[Message, envelope.Event | envelope.InvalidRecord]]:
        return [(message, self._parse(message)) for messages in batch.values() for message in messages]

    async def _complete(
        self, batch: Batch, parsed: list[tuple[Message, envelope.Event | envelope.InvalidRecord]]
    ) -> None:
        """Make one fetched batch durable, announce it, commit its offsets."""
        started = time.perf_counter()
        ids = await self._retrying("store", lambda: self._make_durable(parsed))
        offsets = {tp: messages[-1].offset + 1 for tp, messages in batch.items() if messages}
        await asyncio.gather(self._announce(ids), self._commit(offsets))
        metrics.CONSUMER_BATCH_SECONDS.observe(time.perf_counter() - started)
        self._update_lag(batch)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError:
            # The group moved on during the batch; the new owner re-reads it and skips what is stored.
            logger.warning("commit failed after a rebalance; the batch is already durable")

    def _parse(self, message: ConsumerRecord[bytes, bytes]) -> envelope.Event | envelope.InvalidRecord:
        default_type = settings.KAFKA_TOPIC_TYPES.get(message.topic, "message")
        try:
            return envelope.parse(message.value, max_bytes=settings.KAFKA_MESSAGE_MAX_BYTES, default_type=default_type)
        except envelope.InvalidRecord as exc:
            return exc

    async def _make_durable(
        self, parsed: list[tuple[ConsumerRecord[bytes, bytes], envelope.Event | envelope.InvalidRecord]]
    ) -> list[str]:
        assert self.store is not None
        fresh = parsed
        if any(not isinstance(r, envelope.Event) or r.type != "message" for _, r in parsed):
            # Grants and dead-lettering happen before the store's own offset check: skip what a previous
            # run already stored, so a re-read batch neither re-applies grants nor dead-letters twice.
            partitions = sorted({(m.topic, m.partition) for m, _ in parsed})
            stored = await self.store.stored_offsets(partitions)
            fresh = [(m, result) for m, result in parsed if m.offset > stored[(m.topic, m.partition)]]
        if not fresh:
            return []
        grants = [(m, r) for m, r in fresh if isinstance(r, envelope.Event) and r.type != "message"]
        if grants:
            await sync_to_async(_apply_grants)(grants)
        rejected = [(m, r) for m, r in fresh if isinstance(r, envelope.InvalidRecord)]
        if rejected:
            assert self.producer is not None
            await dead_letters.send(self.producer, rejected)
        records = [
            Record(m.topic, m.partition, m.offset, m.timestamp, r if isinstance(r, envelope.Event) else None)
            for m, r in fresh
        ]
        ids = await self.store.append(records)
        consumed: Counter[tuple[str, str]] = Counter()
        duplicates: Counter[str] = Counter()
        for (message, result), new_id in zip(fresh, ids, strict=True):
            if isinstance(result, envelope.Event):
                if new_id == "dup":
                    duplicates[message.topic] += 1
                elif new_id:
                    consumed[message.topic, result.type] += 1
        for (topic, kind), count in consumed.items():
            metrics.EVENTS_CONSUMED.labels(topic, kind).inc(count)
        for topic, count in duplicates.items():
            metrics.EVENTS_DUPLICATE.labels(topic).inc(count)
        return [i for i in ids if i and i != "dup"]

    async def _announce(self, ids: list[str]) -> None:
        """Tell web processes new events are durable. Best effort: they also poll the store."""
        if not ids:
            return
        try:
            await get_channel_layer().group_send(routing.ANNOUNCE_GROUP, {"type": "events.stored", "last_id": ids[-1]})
        except Exception:
            metrics.BACKEND_ERRORS.labels("channel_layer").inc()
            logger.warning("could not announce new events; web processes will find them by polling", exc_info=True)

    async def _retrying(self, what: str, attempt: Any) -> Any:
        delay = BACKOFF_FIRST
        while True:
            try:
                return await attempt()
            except (aioredis.RedisError, OSError, DatabaseError, KafkaError) as exc:
                backend = _backend_of(exc)
                metrics.BACKEND_ERRORS.labels(backend).inc()
                logger.exception(
                    "%s unavailable while trying to %s; retrying in %.1fs, nothing committed",
                    backend,
                    what,
                    delay,
                    extra={"error": repr(exc)},
                )
                if backend == "database":
                    await sync_to_async(close_old_connections)()
            if self._stop.is_set():
                raise _Stopping
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay * random.uniform(0.8, 1.2))  # noqa: S311
            delay = min(delay * 2, BACKOFF_MAX)

    def _update_lag(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        assert self.consumer is not None
        for tp, messages in batch.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None and messages:
                metrics.CONSUMER_LAG.labels(tp.topic, tp.partition).set(max(0, highwater - messages[-1].offset - 1))


def _backend_of(exc: BaseException) -> str:
    if isinstance(exc, DatabaseError):
        return "database"
    if isinstance(exc, KafkaError):
        return "kafka"
    return "redis"


def _coordinates(message: ConsumerRecord[bytes, bytes]) -> str:
    return f"kafka {message.topic}/{message.partition}/{message.offset}"


def _apply_grants(grants: list[tuple[ConsumerRecord[bytes, bytes], envelope.Event]]) -> None:
    close_old_connections()
    for message, event in grants:
        assert event.user is not None
        assert event.process_instance is not None
        at = datetime.fromtimestamp(message.timestamp / 1000, UTC)
        if event.type == "connect":
            services.grant_apply(
                user=event.user,
                process_instance=event.process_instance,
                granted_by=_coordinates(message),
                source="kafka",
                at=at,
            )
        else:
            services.grant_revoke(
                user=event.user, process_instance=event.process_instance, revoked_by=_coordinates(message), at=at
            )
