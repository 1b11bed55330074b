"""Stream audits: web processes buffer what their streams do; consumer processes write it to the database.

A web process serves thousands of streams on one core, and on two cores a database insert per delivery
measured as the largest single cost of delivery (py-spy, bench/README.md). So the web side only appends
tuples to a list and, once a second, sends the batch to Redis (`events-gateway:audit`, one packed entry);
the AuditSink (a child process of `run_consumer`, events/audit_process.py) writes batches with one INSERT
per table and acknowledges them only
once written. Nothing is lost on a clean shutdown (the last batch goes to Redis before exit) or if the
database is down for a while (batches wait in Redis, bounded by AUDIT_STREAM_MAX_BATCHES).

Shape: one row per event per stream, except live broadcasts, which are one row per event per web process
with the number of streams it went to; which streams those were follows from the streams' open and close
times on that process (see subscriptions.selectors.broadcast_recipients). Replays and drops of
broadcasts keep their per-stream rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgpack
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, IntegrityError, close_old_connections

from events import metrics, routing
from events.store import StoredEvent
from subscriptions import services
from subscriptions.models import DeliveryAudit, Subscription

logger = logging.getLogger(__name__)

# Audits are for humans looking seconds later; one batch a second per web process keeps Redis and the
# database calm whatever the delivery rate.
FLUSH_SECONDS = 1.0
FLUSH_ROWS = 20_000
# While Redis is unreachable a web process holds at most this many delivery rows (the oldest go first).
MAX_PENDING_ROWS = 1_000_000
# Batches waiting for a sink: about this many seconds of all web processes' audits.
AUDIT_STREAM_MAX_BATCHES = 100_000
SINK_GROUP = "audit-sink"
# A batch a sink took but did not acknowledge (it died) is taken over by another after this long.
SINK_CLAIM_IDLE_MS = 60_000


def _subscription_row(sub: Subscription) -> list[Any]:
    return [
        str(sub.id),
        sub.user,
        sub.process_instances,
        sub.auth_method,
        sub.opened_at.timestamp(),
        sub.resumed_from,
        sub.client_address,
        sub.user_agent,
        sub.instance,
        sub.closed_at.timestamp() if sub.closed_at else None,
        sub.close_reason,
        sub.last_event_id,
        sub.events_delivered,
    ]


class AuditWriter:
    """The web side: collects, then sends a batch to Redis every FLUSH_SECONDS and on stop()."""

    def __init__(self, client: aioredis.Redis, instance: str) -> None:
        self.redis = client
        self.instance = instance
        self.mode = settings.AUDIT_DELIVERIES
        self._opened: list[list[Any]] = []
        self._closed: list[list[Any]] = []
        # Tuples of plain values: the collector stops tracking them, so buffered rows cost it nothing.
        self._rows: list[tuple[Any, ...]] = []
        self._broadcasts: list[list[Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Send everything buffered, then return; safe to call more than once."""
        task, self._task = self._task, None
        self._stopping = True
        self._wake.set()
        if task is not None:
            await task
        await self.flush()

    def opened(self, subscription: Subscription) -> None:
        self._opened.append(_subscription_row(subscription))

    def closed(self, subscription: Subscription) -> None:
        self._closed.append(_subscription_row(subscription))
        self._wake.set()

    def delivered(self, stream_id: str, events: list[StoredEvent], status: str, sent_at: float) -> None:
        """Record `events` written to (or, for `dropped`, lost by) stream `stream_id` at `sent_at`."""
        metrics.DELIVERIES.labels(status).inc(len(events))
        if self.mode == "off" or (self.mode == "failures" and status != DeliveryAudit.Status.DROPPED):
            return
        rows = self._rows
        for event in events:
            if event.broadcast and status == DeliveryAudit.Status.DELIVERED:
                continue  # one row per web process, made at fan-out (broadcast())
            rows.append(
                (
                    stream_id,
                    event.id,
                    event.event,
                    status,
                    event.user or "",
                    event.process_instance or "",
                    event.kafka_topic,
                    event.kafka_partition,
                    event.kafka_offset,
                    sent_at,
                    max(0.0, sent_at * 1000 - event.published_ms) if event.published_ms else None,
                )
            )
        if len(rows) > MAX_PENDING_ROWS:
            del rows[: len(rows) - MAX_PENDING_ROWS]
        if len(rows) >= FLUSH_ROWS:
            self._wake.set()

    def broadcast(self, event: StoredEvent, streams: int, at: float) -> None:
        """Record a broadcast handed to `streams` streams of this process at `at`."""
        if self.mode != "all":
            return
        self._broadcasts.append(
            [
                event.id,
                event.event,
                self.instance,
                streams,
                at,
                max(0.0, at * 1000 - event.published_ms) if event.published_ms else None,
                event.kafka_topic,
                event.kafka_partition,
                event.kafka_offset,
            ]
        )

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not (self._opened or self._rows or self._broadcasts or self._closed):
            return
        opened, rows, broadcasts, closed = self._opened, self._rows, self._broadcasts, self._closed
        self._opened, self._rows, self._broadcasts, self._closed = [], [], [], []
        batch = {"opened": opened, "deliveries": rows, "broadcasts": broadcasts, "closed": closed}
        try:
            await self.redis.xadd(
                routing.AUDIT_STREAM, {"b": msgpack.packb(batch)}, maxlen=AUDIT_STREAM_MAX_BATCHES, approximate=True
            )
        except (aioredis.RedisError, OSError):
            logger.warning("could not send stream audits to Redis; keeping them for the next flush", exc_info=True)
            metrics.BACKEND_ERRORS.labels("redis").inc()
            self._opened[:0], self._rows[:0], self._broadcasts[:0], self._closed[:0] = opened, rows, broadcasts, closed


class AuditSink:
    """The consumer side: writes audit batches to the database, acknowledging each once it is written."""

    def __init__(self, client: aioredis.Redis, name: str) -> None:
        self.redis = client
        self.name = name
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                await self._ensure_group()
                written = await self._drain()
                delay = 0.5
                if not written:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 1.0)
            except (aioredis.RedisError, OSError, DatabaseError) as exc:
                metrics.BACKEND_ERRORS.labels("database" if isinstance(exc, DatabaseError) else "redis").inc()
                logger.warning("stream audits wait: %s; retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(routing.AUDIT_STREAM, SINK_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _drain(self) -> int:
        """Write what is waiting (including batches a dead sink left); how many batches were written."""
        claim: Any = await self.redis.xautoclaim(
            routing.AUDIT_STREAM, SINK_GROUP, self.name, min_idle_time=SINK_CLAIM_IDLE_MS, count=20
        )
        entries: list[Any] = list(claim[1])
        response: Any = await self.redis.xreadgroup(SINK_GROUP, self.name, {routing.AUDIT_STREAM: ">"}, count=20)
        for _, stream_entries in response or []:
            entries += stream_entries
        for entry_id, fields in entries:
            if not fields:
                continue
            started = time.perf_counter()
            try:
                await sync_to_async(_write, thread_sensitive=False)(msgpack.unpackb(fields[b"b"]))
            except IntegrityError:
                logger.exception("dropping a batch of stream audits the database refuses")
            await self.redis.xack(routing.AUDIT_STREAM, SINK_GROUP, entry_id)
            await self.redis.xdel(routing.AUDIT_STREAM, entry_id)
            metrics.AUDIT_BATCH_SECONDS.observe(time.perf_counter() - started)
        return len(entries)


def _write(batch: dict[str, Any]) -> None:
    close_old_connections()
    try:
        services.streams_record(
            opened=batch["opened"],
            deliveries=batch["deliveries"],
            broadcasts=batch["broadcasts"],
            closed=batch["closed"],
        )
    finally:
        close_old_connections()
