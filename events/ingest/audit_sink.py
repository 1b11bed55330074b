"""Stream audits, the consumer side: writes the batches web processes send (events/delivery/audit_writer.py)
to the database, acknowledging each only once it is written. Runs in a child process of `run_consumer`
(audit_process.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.db import DatabaseError, DataError, IntegrityError, close_old_connections

from events.core import routing
from events.core.audit import AuditBatch
from events.ops import metrics
from events.ops.supervise import failed
from subscriptions import services

logger = logging.getLogger(__name__)

SINK_GROUP = "audit-sink"
# Batches the database refuses or that cannot be read are moved here (kept for a look, then trimmed).
SET_ASIDE_STREAM = routing.AUDIT_STREAM + ":set-aside"
SET_ASIDE_MAX = 10_000
# A batch a sink took but did not acknowledge (it died) is taken over by another after this long.
SINK_CLAIM_IDLE_MS = 60_000


class SinkFigures(Protocol):
    """Where the sink counts what it does (shared with the parent process, which exports them)."""

    def add(self, *, rows: int = 0, batches: int = 0, set_aside: int = 0, errors: int = 0) -> None: ...


class _NoFigures:
    def add(self, *, rows: int = 0, batches: int = 0, set_aside: int = 0, errors: int = 0) -> None:
        pass


class AuditSink:
    """Reads audit batches from Redis as a consumer group member and writes them to the database."""

    def __init__(self, client: aioredis.Redis, name: str, figures: SinkFigures | None = None) -> None:
        self.redis = client
        self.name = name
        self.figures = figures or _NoFigures()
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
                self.figures.add(errors=1)
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
            raw = fields.get(b"b", b"")
            try:
                batch = AuditBatch.unpack(raw)
            except Exception:  # noqa: BLE001 - whatever is in the entry, it must not stop the sink
                failed("audit-sink", "an audit batch cannot be read; set aside", entry_id=_text(entry_id))
                await self._set_aside(entry_id, raw, "unreadable")
                continue
            try:
                await sync_to_async(_write, thread_sensitive=False)(batch)
            except (IntegrityError, DataError):
                # The database refuses these rows (not: is down); retrying would never succeed.
                failed(
                    "audit-sink", "the database refuses a batch of stream audits; set aside", entry_id=_text(entry_id)
                )
                await self._set_aside(entry_id, raw, "refused")
                continue
            await self._remove(entry_id)
            metrics.AUDIT_BATCH_SECONDS.observe(time.perf_counter() - started)
            self.figures.add(batches=1, rows=len(batch.deliveries) + len(batch.broadcasts))
        return len(entries)

    async def _set_aside(self, entry_id: Any, raw: bytes, why: str) -> None:
        self.figures.add(set_aside=1)
        await self.redis.xadd(SET_ASIDE_STREAM, {"b": raw, "why": why}, maxlen=SET_ASIDE_MAX, approximate=True)
        await self._remove(entry_id)

    async def _remove(self, entry_id: Any) -> None:
        """The batch is written or set aside: acknowledge it and drop it from the audit stream."""
        await self.redis.xack(routing.AUDIT_STREAM, SINK_GROUP, entry_id)
        await self.redis.xdel(routing.AUDIT_STREAM, entry_id)


def _write(batch: AuditBatch) -> None:
    close_old_connections()
    try:
        services.streams_record(batch=batch)
    finally:
        close_old_connections()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
