"""Buffers what streams do (opened, delivered, replayed, dropped, closed) and writes it in batches.

Nothing here runs in the per-event path beyond appending a tuple to a list: rows are built and written
with bulk_create in a worker thread, every FLUSH_SECONDS or when the buffer is large, and on stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, close_old_connections

from events import metrics
from events.store import StoredEvent
from subscriptions import services
from subscriptions.models import DeliveryAudit, Subscription

logger = logging.getLogger(__name__)

# Audits are for humans looking minutes later; one write a second keeps the database calm.
FLUSH_SECONDS = 1.0
FLUSH_ROWS = 20_000
# If the database is down, hold at most this many delivery rows before dropping the oldest.
MAX_PENDING_ROWS = 1_000_000


@dataclass(slots=True)
class _Pending:
    opened: list[Subscription] = field(default_factory=list)
    deliveries: list[tuple[str, StoredEvent, str, float]] = field(default_factory=list)
    closed: list[Subscription] = field(default_factory=list)


class AuditWriter:
    def __init__(self) -> None:
        self.mode = settings.AUDIT_DELIVERIES
        self._pending = _Pending()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Flush everything buffered, then return; safe to call more than once.

        The writer is asked to finish rather than cancelled: a write already handed to its thread must
        complete before the process may exit."""
        task, self._task = self._task, None
        self._stopping = True
        self._wake.set()
        if task is not None:
            await task
        await self.flush()

    def opened(self, subscription: Subscription) -> None:
        self._pending.opened.append(subscription)

    def closed(self, subscription: Subscription) -> None:
        self._pending.closed.append(subscription)
        self._wake.set()

    def delivered(self, stream_id: str, events: list[StoredEvent], status: str, sent_at: float) -> None:
        """Record `events` written to (or, for `dropped`, lost by) stream `stream_id` at `sent_at`."""
        metrics.DELIVERIES.labels(status).inc(len(events))
        if self.mode == "off" or (self.mode == "failures" and status != DeliveryAudit.Status.DROPPED):
            return
        rows = self._pending.deliveries
        rows.extend((stream_id, event, status, sent_at) for event in events)
        if len(rows) > MAX_PENDING_ROWS:
            del rows[: len(rows) - MAX_PENDING_ROWS]
        if len(rows) >= FLUSH_ROWS:
            self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, _Pending()
        if not (pending.opened or pending.deliveries or pending.closed):
            return
        try:
            await sync_to_async(_write, thread_sensitive=False)(pending)
        except IntegrityError:
            # Not transient (the stream's row is gone, e.g. purged): retrying cannot succeed.
            logger.exception("dropping a batch of stream audits the database refuses")
            metrics.BACKEND_ERRORS.labels("database").inc()
        except Exception:
            logger.exception("could not write stream audits; keeping them for the next flush")
            metrics.BACKEND_ERRORS.labels("database").inc()
            self._pending.opened[:0] = pending.opened
            self._pending.deliveries[:0] = pending.deliveries
            self._pending.closed[:0] = pending.closed


def _write(pending: _Pending) -> None:
    close_old_connections()
    try:
        times: dict[float, datetime] = {}
        rows = []
        for stream_id, ev, status, sent_at in pending.deliveries:
            when = times.get(sent_at)
            if when is None:
                when = times[sent_at] = datetime.fromtimestamp(sent_at, UTC)
            rows.append(
                (
                    stream_id,
                    ev.id,
                    ev.event,
                    status,
                    ev.user or "",
                    ev.process_instance or "",
                    ev.kafka_topic,
                    ev.kafka_partition if ev.kafka_partition >= 0 else None,
                    ev.kafka_offset if ev.kafka_offset >= 0 else None,
                    when,
                    max(0.0, sent_at * 1000 - ev.published_ms) if ev.published_ms else None,
                )
            )
        services.streams_record(opened=pending.opened, deliveries=rows, closed=pending.closed)
    finally:
        close_old_connections()
