"""Stream audits, the web side: streams report what they do; once a second the batch goes to Redis.

A web process serves thousands of streams on one core, and on two cores a database insert per delivery
measured as the largest single cost of delivery (py-spy, bench/README.md). So the web side only appends
rows to a list and, once a second, sends the batch to Redis (`events-gateway:audit`, one packed entry);
the audit sink (a child process of `run_consumer`, events/ingest/audit_sink.py) writes batches with one
INSERT per table and acknowledges them only once written. Nothing is lost on a clean shutdown (the last
batch goes to Redis before exit) or if the database is down for a while (batches wait in Redis, bounded by
AUDIT_STREAM_MAX_BATCHES).

Shape (events/core/audit.py): one row per event per stream, except live broadcasts, which are one row per
event per web process with the number of streams it went to; which streams those were follows from the
streams' open and close times on that process (see subscriptions.selectors.broadcast_recipients). Replays
and drops of broadcasts keep their per-stream rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from django.conf import settings

from events.core import routing
from events.core.audit import AuditBatch, BroadcastRow, DeliveryRow, StreamRow
from events.core.records import DeliveryStatus, StoredEvent
from events.ops import metrics
from events.ops.supervise import failed

logger = logging.getLogger(__name__)

# Audits are for humans looking seconds later; one batch a second per web process keeps Redis and the
# database calm whatever the delivery rate.
FLUSH_SECONDS = 1.0
FLUSH_ROWS = 20_000
# While Redis is unreachable a web process holds at most this many delivery rows (the oldest go first).
MAX_PENDING_ROWS = 1_000_000
# Batches waiting for a sink: about this many seconds of all web processes' audits.
AUDIT_STREAM_MAX_BATCHES = 100_000


# The counter's child per status, looked up once (labels() costs more than the increment).
_DELIVERIES = {status: metrics.DELIVERIES.labels(status) for status in DeliveryStatus}


class AuditWriter:
    """Collects, then sends a batch to Redis every FLUSH_SECONDS and on stop()."""

    def __init__(self, client: aioredis.Redis, instance: str) -> None:
        self.redis = client
        self.instance = instance
        self.mode = settings.AUDIT_DELIVERIES
        self._batch = AuditBatch()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        # Deliveries by status since the last flush: the counter moves once a second, not once per event.
        self._counts = dict.fromkeys(DeliveryStatus, 0)

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

    def opened(self, stream: StreamRow) -> None:
        self._batch.opened.append(stream)

    def closed(self, stream: StreamRow) -> None:
        self._batch.closed.append(stream)
        self._wake.set()

    def delivered(self, stream_id: str, events: list[StoredEvent], status: DeliveryStatus, sent_at: float) -> None:
        """Record `events` written to (or, for `dropped`, lost by) stream `stream_id` at `sent_at`."""
        self._counts[status] += len(events)
        if self.mode == "off" or (self.mode == "failures" and status != DeliveryStatus.DROPPED):
            return
        rows = self._batch.deliveries
        for event in events:
            if event.broadcast and status == DeliveryStatus.DELIVERED:
                continue  # one row per web process, made at fan-out (broadcast())
            rows.append(
                DeliveryRow(
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
                    _latency_ms(event, sent_at),
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
        self._batch.broadcasts.append(
            BroadcastRow(
                event.id,
                event.event,
                self.instance,
                streams,
                at,
                _latency_ms(event, at),
                event.kafka_topic,
                event.kafka_partition,
                event.kafka_offset,
            )
        )

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send what is buffered. Redis down: keep it for the next flush. A batch that cannot be packed
        (a bug, or a value the format cannot carry) is logged, counted and set aside; the next one goes."""
        for status, count in self._counts.items():
            if count:
                _DELIVERIES[status].inc(count)
                self._counts[status] = 0
        batch, self._batch = self._batch, AuditBatch()
        if not batch:
            return
        try:
            packed = batch.pack()
        except Exception:  # noqa: BLE001 - one bad batch must not stop audits
            failed(
                "audit-writer",
                "could not pack a batch of stream audits; set aside",
                rows=len(batch.deliveries) + len(batch.opened) + len(batch.closed) + len(batch.broadcasts),
            )
            return
        try:
            await self.redis.xadd(
                routing.AUDIT_STREAM, {"b": packed}, maxlen=AUDIT_STREAM_MAX_BATCHES, approximate=True
            )
        except (aioredis.RedisError, OSError):
            logger.warning("could not send stream audits to Redis; keeping them for the next flush", exc_info=True)
            metrics.BACKEND_ERRORS.labels("redis").inc()
            self._batch.prepend(batch)


def _latency_ms(event: StoredEvent, at: float) -> float | None:
    return max(0.0, at * 1000 - event.published_ms) if event.published_ms else None
