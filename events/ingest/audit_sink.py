"""Stream audits, the consumer side: writes the batches web processes send (events/delivery/audit_writer.py)
to the database, acknowledging each only once it is written. Runs in a child process of `run_consumer`
(audit_process.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.db import DatabaseError, IntegrityError, close_old_connections

from events.core import routing
from events.core.audit import AuditBatch
from events.ops import metrics
from subscriptions import services

logger = logging.getLogger(__name__)

SINK_GROUP = "audit-sink"
# A batch a sink took but did not acknowledge (it died) is taken over by another after this long.
SINK_CLAIM_IDLE_MS = 60_000


class AuditSink:
    """Reads audit batches from Redis as a consumer group member and writes them to the database."""

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
                await sync_to_async(_write, thread_sensitive=False)(AuditBatch.unpack(fields[b"b"]))
            except IntegrityError:
                logger.exception("dropping a batch of stream audits the database refuses")
            await self.redis.xack(routing.AUDIT_STREAM, SINK_GROUP, entry_id)
            await self.redis.xdel(routing.AUDIT_STREAM, entry_id)
            metrics.AUDIT_BATCH_SECONDS.observe(time.perf_counter() - started)
        return len(entries)


def _write(batch: AuditBatch) -> None:
    close_old_connections()
    try:
        services.streams_record(batch=batch)
    finally:
        close_old_connections()
