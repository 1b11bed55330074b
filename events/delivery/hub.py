"""One per web process: reads new events from the store in id order and hands each to its streams.

The consumer announces on the channel layer (group ANNOUNCE_GROUP) that events are durable; the hub then
reads the global stream after the last id it fanned out. The announcement carries no event, so a dropped
or missing announcement (channels_redis drops on full channels; a consumer can die between storing and
announcing) costs latency, never an event: the hub also polls every POLL_SECONDS. Reading one totally
ordered stream means every stream sees its events in id order, whichever consumer stored them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from channels.layers import get_channel_layer
from django.conf import settings

from events.core import routing, sse
from events.core.instance import INSTANCE
from events.core.records import CloseReason, StoredEvent
from events.core.store import EventStore
from events.delivery import renewal
from events.delivery.audit_writer import AuditWriter
from events.ops import metrics
from events.ops.supervise import Supervisor, failed

if TYPE_CHECKING:
    from events.delivery.stream import Stream

logger = logging.getLogger(__name__)

# Without announcements (channel layer down, consumer crashed mid-batch) events still arrive within this.
POLL_SECONDS = 1.0
# The ticker drives heartbeats, token expiry and the cross-process stream count.
TICK_SECONDS = 1.0
# Open-stream slots of a process that died expire after this; refreshed every tick-set.
SLOT_TTL_SECONDS = 60
# On shutdown, releasing the open streams' slots in Redis may take this long before it is given up.
SLOT_RELEASE_SECONDS = 2.0

_CLAIM_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class Hub:
    def __init__(self) -> None:
        self.redis = aioredis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
        self.store = EventStore(self.redis, retention_seconds=settings.EVENTS_RETENTION_SECONDS)
        self.audit = AuditWriter(self.redis, INSTANCE)
        self.frontier = "0-0"
        self.streams: set[Stream] = set()
        self._by_user: defaultdict[str, set[Stream]] = defaultdict(set)
        self._by_process: defaultdict[str, set[Stream]] = defaultdict(set)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # set whenever the last stream leaves
        self._tasks: list[asyncio.Task[None]] = []  # slot releases in flight
        self._supervisor = Supervisor()
        self._claim = self.redis.register_script(_CLAIM_LUA)
        self.healthy = False

    async def start(self) -> None:
        self.frontier = await self.store.last_id()
        self.healthy = True
        self.audit.start()
        self._supervisor.start("hub-read", self._read)
        self._supervisor.start("hub-listen", self._listen)
        self._supervisor.start("hub-tick", self._tick)

    def alive(self) -> dict[str, bool]:
        """Readiness: the hub's tasks and the audit writer are running."""
        return {**self._supervisor.alive(), "audit-writer": self.audit.alive()}

    async def stop(self, grace: float = 5.0) -> None:
        """Close every stream with a final retry, flush audits, release connections. Idempotent."""
        for stream in list(self.streams):
            stream.close(CloseReason.SHUTDOWN)
        if self.streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        await self._supervisor.stop()
        # Let the streams' slot releases finish (a user's tabs reconnect to another process at once and must
        # not find their old slots taken); only what is still stuck after a moment is cancelled.
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=SLOT_RELEASE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.audit.stop()
        await self.redis.aclose()

    # --- streams ---------------------------------------------------------------------------------------
    async def claim_slot(self, user: str, stream_id: str) -> bool:
        """Count the stream against EVENTS_MAX_STREAMS_PER_USER across every web process."""
        return bool(
            await self._claim(
                keys=[routing.STREAMS_OF_USER_PREFIX + user],
                args=[time.time(), settings.EVENTS_MAX_STREAMS_PER_USER, SLOT_TTL_SECONDS, stream_id],
            )
        )

    def register(self, stream: Stream) -> str:
        """Start handing events to `stream`; returns the id after which they start."""
        self.streams.add(stream)
        self._drained.clear()
        self._by_user[stream.user].add(stream)
        for process_instance in stream.followed:
            self._by_process[process_instance].add(stream)
        return self.frontier

    def unfollow(self, stream: Stream, process_instance: str) -> None:
        members = self._by_process.get(process_instance)
        if members is not None:
            members.discard(stream)
            if not members:
                del self._by_process[process_instance]

    def unregister(self, stream: Stream) -> None:
        self.streams.discard(stream)
        if not self.streams:
            self._drained.set()
        members = self._by_user.get(stream.user)
        if members is not None:
            members.discard(stream)
            if not members:
                del self._by_user[stream.user]
        for process_instance in list(stream.followed):
            self.unfollow(stream, process_instance)
        task = asyncio.get_running_loop().create_task(self._release_slot(stream))
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    async def _release_slot(self, stream: Stream) -> None:
        with contextlib.suppress(aioredis.RedisError):  # the slot expires by itself
            await self.redis.zrem(routing.STREAMS_OF_USER_PREFIX + stream.user, stream.id)

    # --- fan-out ---------------------------------------------------------------------------------------
    def fan_out(self, event: StoredEvent) -> None:
        if event.type == "connect":
            return
        if event.type == "disconnect":
            assert event.process_instance is not None
            for stream in list(self._by_process.get(event.process_instance, ())):
                if stream.user == event.user:
                    stream.push_unsubscribe(event)
            return
        if event.broadcast:
            targets: set[Stream] | list[Stream] = self.streams
        elif event.process_instance is not None:
            targets = self._by_process.get(event.process_instance, set())
            if event.user is not None:
                targets = [s for s in targets if s.user == event.user]
        else:
            targets = self._by_user.get(event.user or "", set())
        if not targets:
            return
        frame = sse.frame(event.id, event.event, render(event))
        for stream in targets:
            stream.push(event, frame)
        if event.broadcast:
            self.audit.broadcast(event, len(targets), time.time())

    async def _read(self) -> None:
        """Fan out every entry after the frontier, in id order. An entry that cannot be read or handed out
        is logged with its id, counted and skipped: the frontier always moves past it."""
        delay = 0.2
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            self._wake.clear()
            try:
                while True:
                    batch = await self.store.read_all(self.frontier)
                    for entry_id, why in batch.unreadable:
                        metrics.TASK_FAILURES.labels("hub-read").inc()
                        logger.error("skipping an unreadable stored event", extra={"event_id": entry_id, "why": why})
                    for event in batch.events:
                        try:
                            self.fan_out(event)
                        except Exception:  # noqa: BLE001 - one event must not stop delivery to everyone
                            failed("hub-read", "could not hand out a stored event; skipped", event_id=event.id)
                    if batch.last_id is not None:
                        self.frontier = batch.last_id
                    if not batch.full:
                        break
                self.healthy, delay = True, 0.2
            except (aioredis.RedisError, OSError):
                if self.healthy:
                    logger.exception("cannot read the event store; streams wait and catch up when it returns")
                self.healthy = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _listen(self) -> None:
        layer = get_channel_layer()
        while True:
            try:
                channel = await layer.new_channel()
                await layer.group_add(routing.ANNOUNCE_GROUP, channel)
                while True:
                    await layer.receive(channel)
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("channel layer unavailable; relying on polling", exc_info=True)
                await asyncio.sleep(2)

    async def _tick(self) -> None:
        refresh_every = max(1, int(SLOT_TTL_SECONDS / 3 / TICK_SECONDS))
        ticks = 0
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.time()
            at_end: list[Stream] = []
            for stream in list(self.streams):
                try:
                    stream.tick(now)
                    if stream.renewal_due:
                        at_end.append(stream)
                except Exception:  # noqa: BLE001 - one stream must not stop the others' heartbeats
                    failed("hub-tick", "stream tick failed", stream=stream.id)
            if at_end:  # bearer streams at their token's end: renewed meanwhile (any process), or closed
                await renewal.settle(self.redis, at_end, now)
            ticks += 1
            if ticks % refresh_every == 0 and self.streams:
                await self._refresh_slots(now)

    async def _refresh_slots(self, now: float) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in self.streams:
                    key = routing.STREAMS_OF_USER_PREFIX + stream.user
                    pipe.zadd(key, {stream.id: now + SLOT_TTL_SECONDS})
                    pipe.expire(key, SLOT_TTL_SECONDS)
                await pipe.execute()
        except aioredis.RedisError:
            logger.warning("could not refresh open-stream slots", exc_info=True)


def render(event: StoredEvent) -> str:
    return sse.payload(
        data_json=event.data_json,
        process_instance=event.process_instance,
        user=event.user,
        broadcast=event.broadcast,
        published_ms=event.published_ms,
    )


_hub: Hub | None = None
_hub_lock: asyncio.Lock | None = None
_started_hooks: list[Callable[[], None]] = []


def on_started(callback: Callable[[], None]) -> None:
    """Call `callback` in the event loop once the process's hub has started (the server adapter's hook)."""
    _started_hooks.append(callback)


async def get_hub() -> Hub:
    """The process's hub, started on first use (daphne has no lifespan events)."""
    global _hub, _hub_lock  # noqa: PLW0603 - one hub per process
    if _hub is not None:
        return _hub
    if _hub_lock is None:
        _hub_lock = asyncio.Lock()
    async with _hub_lock:
        if _hub is None:
            hub = Hub()
            await hub.start()
            _hub = hub
            for callback in _started_hooks:
                callback()
    return _hub


def current_hub() -> Hub | None:
    """The process's hub if it has started (readiness asks without starting one)."""
    return _hub


async def shutdown_hub() -> None:
    global _hub
    hub, _hub = _hub, None
    if hub is not None:
        await hub.stop()
