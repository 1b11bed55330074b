"""The consumer service: Kafka batches -> validation -> Redis (durable, published live) -> commit.

Invariants:
- An offset is committed only after every record up to it is durable in Redis (or dead-lettered).
- A record re-read after a crash or a rebalance is recognised by its offset (recorded in Redis in the
  same atomic step as the event) and neither stored nor dead-lettered twice; a batch retried in-process
  after a backend failure repeats neither its grants nor its dead letters.
- A backing service that fails (Redis, the database, the DLQ producer) stops fetching; the batch is
  retried with backoff until it succeeds or the service is asked to stop, and nothing is committed.
- No record stops the loop: one the gateway fails on (a bug, a value the database refuses) is logged with
  its coordinates, counted, dead-lettered with reason `internal`, and the batch goes on without it.
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
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, close_old_connections

from events.core import backends, envelope
from events.core.records import Record
from events.core.store import EventStore
from events.ingest import dead_letters
from events.ingest.kafka import kafka_options
from events.ops import metrics
from events.ops.supervise import cancel_and_wait, failed
from subscriptions import services

logger = logging.getLogger(__name__)

MAX_BATCH = 5000
# How long a fetch waits for records; an idle consumer wakes this often to check for a stop request.
FETCH_WAIT_MS = 500
# Lag is refreshed this often for every assigned partition, whether batches flow or not.
LAG_SECONDS = 5.0

Message: TypeAlias = ConsumerRecord[bytes, bytes]
Batch: TypeAlias = dict[TopicPartition, list[Message]]
Parsed: TypeAlias = list[tuple[Message, envelope.Event | envelope.InvalidRecord]]
# Backoff while a backing service is down: start fast (a blip), settle at 5 s (a restart).
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0
# Database errors that are a record's fault, not an outage: retrying them would never succeed.
_REFUSALS = (DataError, IntegrityError)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: IngestService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # A batch in hand whose partitions move is finished (commits skip partitions no longer assigned)
        # and re-read by the new owner, which recognises it by its stored offsets.
        logger.info("partitions revoked", extra={"partitions": sorted(str(tp) for tp in revoked)})
        self.service.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        logger.info("partitions assigned", extra={"partitions": sorted(str(tp) for tp in assigned)})
        self.service.own(assigned)


class _Stopping(Exception):
    """Raised out of a retry loop when the service is asked to stop."""


class _BatchWork:
    """One fetched batch and what has been done for it, so that a retry repeats no side effect."""

    def __init__(self, parsed: Parsed, received_ms: int) -> None:
        self.parsed = parsed
        self.received_ms = received_ms
        self.grants_applied = False
        self.dead_lettered: set[int] = set()  # indexes into parsed
        self.rejections_recorded = False


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
        self._done: dict[TopicPartition, int] = {}  # next offset to make durable, per partition owned
        # The partitions this consumer owns, from the rebalance listener: none while a rebalance is in progress,
        # when aiokafka's assignment() still lists the partitions just revoked.
        self._owned: set[TopicPartition] = set()
        self.ready = False
        self.running = False

    async def start(self) -> None:
        self.redis = backends.redis_client(timeout=10, connect_timeout=5)
        self.store = EventStore(
            self.redis, retention_seconds=settings.EVENTS_RETENTION_SECONDS, keyspace=backends.keyspace()
        )
        self.producer = AIOKafkaProducer(**kafka_options(), acks="all", enable_idempotence=False)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            **kafka_options(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=settings.KAFKA_FETCH_MAX_WAIT_MS,
            # How long the group waits for a silent consumer before handing its partitions on.
            session_timeout_ms=settings.KAFKA_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=min(3000, settings.KAFKA_SESSION_TIMEOUT_MS // 3),
        )
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
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

    def own(self, partitions: set[TopicPartition]) -> None:
        """The partitions a rebalance gave this consumer."""
        self._owned = set(partitions)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions this consumer no longer owns: no lag figure, no progress kept."""
        self._owned -= partitions
        for tp in partitions:
            self._done.pop(tp, None)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))

    async def rewind(self) -> None:
        """Fetch again from what is durable (what a restarted loop must do: it may have fetched a batch it
        never stored). What was stored after all is recognised by its offset and skipped."""
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            self.consumer.seek(tp, await self._durable_position(tp))

    async def _durable_position(self, tp: TopicPartition) -> int:
        """The next offset of `tp` to make durable: from this consumer's own progress, else the group's
        commit, else (never committed) the partition's start, as auto_offset_reset=earliest reads it."""
        assert self.consumer is not None
        done = self._done.get(tp)
        if done is None:
            done = await self.consumer.committed(tp)
        if done is None:
            done = (await self.consumer.beginning_offsets([tp]))[tp]
        return done

    async def run(self) -> None:
        """Consume until request_stop(); the service must be started.

        Two batches overlap: the next one is fetched and validated while the previous one is being made
        durable and committed. Batches are stored and committed strictly one after the other.
        """
        assert self.consumer is not None
        in_flight: asyncio.Task[None] | None = None
        lag = asyncio.get_running_loop().create_task(self._refresh_lag(), name="consumer-lag")
        self.running = True
        delay = BACKOFF_FIRST
        try:
            while not self._stop.is_set():
                try:
                    batch = await self.consumer.getmany(timeout_ms=FETCH_WAIT_MS, max_records=MAX_BATCH)
                    delay = BACKOFF_FIRST
                except KafkaError as exc:
                    metrics.BACKEND_ERRORS.labels("kafka").inc()
                    logger.warning("fetch failed: %r; retrying in %.1fs", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                work = _BatchWork(self._parse_batch(batch), int(time.time() * 1000))
                if in_flight is not None:
                    await in_flight
                    in_flight = None
                if batch:
                    in_flight = asyncio.get_running_loop().create_task(self._complete(batch, work))
            if in_flight is not None:
                await in_flight
        except _Stopping:
            logger.warning("stopping with a batch not yet durable; it will be re-read")
        finally:
            self.running = False
            for task in (in_flight, lag):
                if task is not None and not task.done():
                    await cancel_and_wait([task])
                    with contextlib.suppress(asyncio.CancelledError, _Stopping):
                        await task

    def _parse_batch(self, batch: Batch) -> Parsed:
        return [(message, self._parse(message)) for messages in batch.values() for message in messages]

    def _parse(self, message: Message) -> envelope.Event | envelope.InvalidRecord:
        default_type = settings.KAFKA_TOPIC_TYPES.get(message.topic, "message")
        try:
            return envelope.parse(message.value, max_bytes=settings.KAFKA_MESSAGE_MAX_BYTES, default_type=default_type)
        except envelope.InvalidRecord as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - parse raises nothing else; if it does, the record is set aside
            failed("consumer", "parsing a record failed", **_where(message))
            return _internal(exc)

    async def _complete(self, batch: Batch, work: _BatchWork) -> None:
        """Make one fetched batch durable (which also publishes it live), then commit its offsets."""
        started = time.perf_counter()
        try:
            await self._retrying("store", lambda: self._make_durable(work))
        except _Stopping:
            raise
        except Exception:  # noqa: BLE001 - a record the gateway fails on must not stop the loop
            failed(
                "consumer",
                "storing a batch failed; storing its records one by one",
                partitions=sorted(str(tp) for tp in batch),
            )
            await self._one_by_one(work)
        offsets = {tp: messages[-1].offset + 1 for tp, messages in batch.items() if messages}
        # A batch in hand across a rebalance: progress on partitions given away meanwhile is the new owner's.
        self._done.update({tp: offset for tp, offset in offsets.items() if tp in self._owned})
        await self._commit(offsets)
        metrics.CONSUMER_BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _one_by_one(self, work: _BatchWork) -> list[str]:
        """Store each record of a batch alone; one that still fails is dead-lettered as `internal`."""
        ids: list[str] = []
        for index, (message, result) in enumerate(work.parsed):
            single = _BatchWork([(message, result)], work.received_ms)
            single.dead_lettered = {0} if index in work.dead_lettered else set()
            single.rejections_recorded = work.rejections_recorded
            try:
                ids += await self._retrying("store", lambda single=single: self._make_durable(single))
                continue
            except _Stopping:
                raise
            except Exception as exc:  # noqa: BLE001
                failed("consumer", "a record could not be stored; dead-lettering it", **_where(message))
                aside = _BatchWork([(message, _internal(exc))], work.received_ms)
            try:
                await self._retrying("dead-letter", lambda aside=aside: self._make_durable(aside))
            except _Stopping:
                raise
            except Exception:  # noqa: BLE001
                failed("consumer", "a record could not be dead-lettered either; skipped", **_where(message))
        return ids

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit what is still ours. A failed commit is only logged: the batch is durable, and a re-read
        is recognised by its stored offsets."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError):
            # The group moved on during the batch; the new owner re-reads it and skips what is stored.
            logger.warning("commit failed after a rebalance; the batch is already durable")
        except KafkaError as exc:
            metrics.BACKEND_ERRORS.labels("kafka").inc()
            logger.warning("commit failed (%r); the batch is already durable and a re-read skips it", exc)

    async def _make_durable(self, work: _BatchWork) -> list[str]:
        assert self.store is not None
        indexed = list(enumerate(work.parsed))
        fresh = indexed
        if any(not isinstance(r, envelope.Event) or r.type != "message" for _, r in work.parsed):
            # Grants and dead-lettering happen before the store's own offset check: skip what a previous
            # run already stored, so a re-read batch neither re-applies grants nor dead-letters twice.
            partitions = sorted({(m.topic, m.partition) for m, _ in work.parsed})
            stored = await self.store.stored_offsets(partitions)
            fresh = [(i, (m, r)) for i, (m, r) in indexed if m.offset > stored[(m.topic, m.partition)]]
        if not fresh:
            return []
        if not work.grants_applied:
            await self._apply_grants(
                [(m, r) for _, (m, r) in fresh if isinstance(r, envelope.Event) and r.type != "message"],
                work.received_ms,
            )
            work.grants_applied = True
        rejected = [(i, m, r) for i, (m, r) in fresh if isinstance(r, envelope.InvalidRecord)]
        for index, message, error in rejected:
            if index not in work.dead_lettered:
                assert self.producer is not None
                await dead_letters.publish(self.producer, message, error)
                work.dead_lettered.add(index)
        if rejected and not work.rejections_recorded:
            await sync_to_async(dead_letters.record)([(m, r) for _, m, r in rejected])
            work.rejections_recorded = True
        records = [
            Record(
                m.topic,
                m.partition,
                m.offset,
                envelope.published_ms(m.timestamp, received_ms=work.received_ms),
                r if isinstance(r, envelope.Event) else None,
            )
            for _, (m, r) in fresh
        ]
        ids = await self.store.append(records)
        consumed: Counter[tuple[str, str]] = Counter()
        duplicates: Counter[str] = Counter()
        for (_, (message, result)), new_id in zip(fresh, ids, strict=True):
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

    async def _apply_grants(self, grants: list[tuple[Message, envelope.Event]], received_ms: int) -> None:
        """Apply connect / disconnect records, except those whose producer id was seen before (in the store,
        or earlier in this batch): a repeated record changes nothing."""
        if not grants:
            return
        assert self.store is not None
        seen = await self.store.seen_producer_ids([e for _, e in grants])
        fresh = []
        for message, event in grants:
            if event.producer_id:
                if event.producer_id in seen:
                    continue
                seen.add(event.producer_id)
            fresh.append((message, event))
        if fresh:
            await sync_to_async(_apply_grants)(fresh, received_ms)

    async def _retrying(self, what: str, attempt: Any) -> Any:
        delay = BACKOFF_FIRST
        while True:
            try:
                return await attempt()
            except _REFUSALS:
                raise
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

    async def _refresh_lag(self) -> None:
        """Every LAG_SECONDS: records behind each assigned partition's end, counted from what is durable.
        It climbs while a backend is down (nothing is made durable) and is dropped on revoke."""
        while True:
            await asyncio.sleep(LAG_SECONDS)
            consumer = self.consumer
            if consumer is None:
                continue
            try:
                owned = list(self._owned)
                if not owned:
                    continue
                ends = await consumer.end_offsets(owned)
                for tp, end in ends.items():
                    done = await self._durable_position(tp)
                    # Still ours after the awaits: a figure for a partition given away would never be removed.
                    if tp in self._owned:
                        metrics.CONSUMER_LAG.labels(tp.topic, tp.partition).set(max(0, end - done))
            except (KafkaError, IllegalStateError) as exc:
                logger.debug("lag not refreshed: %r", exc)


def _backend_of(exc: BaseException) -> str:
    if isinstance(exc, DatabaseError):
        return "database"
    if isinstance(exc, KafkaError):
        return "kafka"
    return "redis"


def _coordinates(message: ConsumerRecord[bytes, bytes]) -> str:
    return f"kafka {message.topic}/{message.partition}/{message.offset}"


def _where(message: Message) -> dict[str, Any]:
    return {"topic": message.topic, "partition": message.partition, "offset": message.offset}


def _internal(exc: BaseException) -> envelope.InvalidRecord:
    return envelope.InvalidRecord(envelope.Rejection.INTERNAL, f"{type(exc).__name__}: {exc}"[:300])


def _apply_grants(grants: list[tuple[Message, envelope.Event]], received_ms: int) -> None:
    close_old_connections()
    for message, event in grants:
        assert event.user is not None
        assert event.process_instance is not None
        at = datetime.fromtimestamp(envelope.published_ms(message.timestamp, received_ms=received_ms) / 1000, UTC)
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
