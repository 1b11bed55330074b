"""One per web process: the registry of its streams, the live feed of their sources, slots, ticks, audits.

Events reach a web process through the live feed (events.delivery.feed), which subscribes to exactly the
sources the registry (events.delivery.registry) says its streams read; each live event goes to the streams
reading its source, and each stream decides what it may see (events.delivery.stream). The hub owns those
pieces and their tasks; a stream talks to the hub only through attach, detach, unfollow and feed_head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

from events.core import backends, positions, routing
from events.core.instance import INSTANCE
from events.core.records import CloseReason, StoredEvent
from events.core.routing import Source
from events.core.store import EventStore
from events.delivery import renewal
from events.delivery.audit_writer import AuditWriter
from events.delivery.feed import Feed
from events.delivery.registry import Registry
from events.delivery.stream import Stream, render
from events.ops import metrics
from events.ops.supervise import Supervisor, cancel_and_wait, failed

logger = logging.getLogger(__name__)

# The ticker drives heartbeats, token expiry and the cross-process stream count.
TICK_SECONDS = 1.0
# Open-stream slots of a process that died expire after this; refreshed every tick-set.
SLOT_TTL_SECONDS = 60
# On shutdown, releasing the open streams' slots in Redis may take this long before it is given up.
SLOT_RELEASE_SECONDS = 2.0
# A stream whose sources' subscriptions are not confirmed within this is answered with a retry.
ATTACH_SECONDS = 10.0

# A slot for the stream in its user's set, if the user has fewer than the maximum (a cluster's claims, one
# by one: a bearer stream's end, renewal.expiry_record, is another hash slot's and is kept before).
_CLAIM_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
# The same for the claims of several streams in one call, each bearer stream's end kept in the same step
# (single Redis only: the keys span hash slots). In the order given, so that two streams of one user count
# against each other. KEYS: each claim's user set and expiry key; ARGV: now, the maximum, the slot TTL, then
# per claim the stream id, the expiry record's value (empty for a stream without an end) and its seconds.
# Returns 1 or 0 per claim.
_CLAIM_MANY_LUA = """
local now, most, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local granted = {}
for i = 1, #KEYS / 2 do
  local slots, expiry, at = KEYS[2 * i - 1], KEYS[2 * i], 3 + 3 * (i - 1)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if redis.call('ZCARD', slots) >= most then
    granted[i] = 0
  else
    if ARGV[at + 2] ~= '' then redis.call('SET', expiry, ARGV[at + 2], 'EX', tonumber(ARGV[at + 3])) end
    redis.call('ZADD', slots, now + ttl, ARGV[at + 1])
    redis.call('EXPIRE', slots, ttl)
    granted[i] = 1
  end
end
return granted
"""
# Claims sent in one call at most.
CLAIMS_PER_CALL = 200


@dataclass(slots=True)
class _Claim:
    user: str
    stream_id: str
    expires_at: float | None
    granted: asyncio.Future[bool]


def _refuse(claims: list[_Claim], exc: Exception) -> None:
    for claim in claims:
        claim.granted.set_exception(exc)
        claim.granted.add_done_callback(lambda f: f.exception())  # seen, even if its stream left meanwhile


class Hub:
    def __init__(self) -> None:
        self.redis = backends.redis_client(timeout=5, connect_timeout=2)
        self.store = EventStore(
            self.redis, retention_seconds=settings.EVENTS_RETENTION_SECONDS, keyspace=backends.keyspace()
        )
        self.audit = AuditWriter(self.redis, INSTANCE)
        self.registry = Registry(on_first=self._first_reader, on_last=self._last_reader)
        self.feed = Feed(
            store=self.store,
            nodes=backends.channel_nodes(self.redis),
            sharded=self.store.keys.cluster,
            dispatch=self._dispatch,
            on_gap=self._gap,
        )
        self._drained = asyncio.Event()  # set whenever the last stream leaves
        self._next_heads: asyncio.Future[positions.Position] | None = None
        self._tasks: list[asyncio.Task[None]] = []  # slot releases in flight
        self._supervisor = Supervisor()
        self._claim = self.redis.register_script(_CLAIM_LUA)
        self._claim_many = self.redis.register_script(_CLAIM_MANY_LUA)
        self._claims: list[_Claim] = []  # asked for since the last call was sent
        self._claim_calls: set[asyncio.Task[None]] = set()

    @property
    def streams(self) -> list[Stream]:
        return self.registry.readers()  # type: ignore[return-value]

    @property
    def healthy(self) -> bool:
        """The live feed is connected (streams get events as they are stored)."""
        return self.feed.connected()

    async def start(self) -> None:
        if self.store.keys.cluster:
            await self.redis.initialize()  # the slot map, which the feed needs to find a channel's node
        self.feed.head = list(await self.store.heads())
        self.audit.start()
        self._supervisor.start("hub-tick", self._tick)

    def alive(self) -> dict[str, bool]:
        """Readiness: the hub's tasks, the live feed and the audit writer are running."""
        return {**self._supervisor.alive(), "hub-feed": self.feed.alive(), "audit-writer": self.audit.alive()}

    async def stop(self, grace: float = 5.0) -> None:
        """Close every stream with a final retry, flush audits, release connections. Idempotent."""
        for stream in self.streams:
            stream.close(CloseReason.SHUTDOWN)
        if len(self.registry):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        await self._supervisor.stop()
        await self.feed.stop()
        calls = list(self._claim_calls)
        await cancel_and_wait(calls)
        await asyncio.gather(*calls, return_exceptions=True)
        # Let the streams' slot releases finish (a user's tabs reconnect to another process at once and must
        # not find their old slots taken); only what is still stuck after a moment is cancelled.
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=SLOT_RELEASE_SECONDS)
            await cancel_and_wait(pending)
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.audit.stop()
        await self.redis.aclose()

    # --- streams ---------------------------------------------------------------------------------------
    async def claim_slot(self, user: str, stream_id: str, expires_at: float | None = None) -> bool:
        """Count the stream against EVENTS_MAX_STREAMS_PER_USER across every web process; a bearer stream's
        end (`expires_at`) is kept before its slot is, so a renewal that finds the slot finds the end too.

        On a single Redis, the streams opening at the same moment share one call: it is sent on the loop's
        next turn, after all of them asked (a script call through redis-py costs more of the web process's
        CPU than everything else an opening stream does in Redis)."""
        if self.store.keys.cluster:
            return await self._claim_alone(user, stream_id, expires_at)
        loop = asyncio.get_running_loop()
        claim = _Claim(user, stream_id, expires_at, loop.create_future())
        if not self._claims:
            loop.call_soon(self._send_claims)
        self._claims.append(claim)
        return await asyncio.shield(claim.granted)

    async def _claim_alone(self, user: str, stream_id: str, expires_at: float | None) -> bool:
        """One claim in its own call (a cluster: the slot set and the expiry record are in two hash slots)."""
        if expires_at is not None:
            await renewal.record_expiry(self.redis, stream_id, expires_at)
        keys = [routing.STREAMS_OF_USER_PREFIX + user]
        args: list[Any] = [time.time(), settings.EVENTS_MAX_STREAMS_PER_USER, SLOT_TTL_SECONDS, stream_id]
        return bool(await self._claim(keys=keys, args=args))

    def _send_claims(self) -> None:
        claims, self._claims = self._claims, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(claims), CLAIMS_PER_CALL):
            call = loop.create_task(self._call_claims(claims[start : start + CLAIMS_PER_CALL]))
            self._claim_calls.add(call)
            call.add_done_callback(self._claim_calls.discard)

    async def _call_claims(self, claims: list[_Claim]) -> None:
        keys: list[str] = []
        args: list[Any] = [time.time(), settings.EVENTS_MAX_STREAMS_PER_USER, SLOT_TTL_SECONDS]
        for claim in claims:
            if claim.expires_at is None:  # no end to keep: the script skips the expiry key
                expiry_key, value, seconds = routing.stream_expiry_key(claim.stream_id), "", 0
            else:
                expiry_key, value, seconds = renewal.expiry_record(claim.stream_id, claim.expires_at)
            keys += [routing.STREAMS_OF_USER_PREFIX + claim.user, expiry_key]
            args += [claim.stream_id, value, seconds]
        try:
            granted = await self._claim_many(keys=keys, args=args)
        except asyncio.CancelledError:  # the hub is stopping
            for claim in claims:
                claim.granted.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every claim of the call fails with it (the stream asks to retry)
            _refuse(claims, exc)
            return
        if not isinstance(granted, list) or len(granted) != len(claims):
            _refuse(claims, aioredis.ResponseError(f"the claim script answered {granted!r}"))
            return
        for claim, answer in zip(claims, granted, strict=True):
            claim.granted.set_result(bool(answer))

    async def attach(self, stream: Stream) -> None:
        """Hand `stream` the live events of its sources from now on; return once their subscriptions are
        confirmed (so that what the store holds at that moment plus what the feed hands out is everything).
        Raises TimeoutError if the feed cannot confirm them (Redis unreachable)."""
        self.registry.add(stream)
        self._drained.clear()
        try:
            async with asyncio.timeout(ATTACH_SECONDS):
                await self.feed.ready(stream.sources)
        except BaseException:
            self.registry.remove(stream)
            raise

    def unfollow(self, stream: Stream, source: Source) -> None:
        """`stream` stopped following a process instance (a disconnect)."""
        self.registry.drop_source(stream, source)

    def detach(self, stream: Stream) -> None:
        self.registry.remove(stream)
        if not len(self.registry):
            self._drained.set()
        task = asyncio.get_running_loop().create_task(self._release_slot(stream))
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    async def fresh_heads(self) -> positions.Position:
        """The store's heads, read after this call began (what an opening stream starts from). Streams opening
        at the same moment share one read: it starts on the loop's next turn, after all of them asked."""
        future = self._next_heads
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._next_heads = loop.create_future()
            loop.call_soon(self._read_heads, future)
        return await asyncio.shield(future)

    def _read_heads(self, future: asyncio.Future[positions.Position]) -> None:
        self._next_heads = None
        task = asyncio.get_running_loop().create_task(self.store.heads())

        def settle(done: asyncio.Task[positions.Position]) -> None:
            if future.done():
                return
            if done.cancelled():
                future.cancel()
            elif (error := done.exception()) is not None:
                future.set_exception(error)
                future.add_done_callback(lambda f: f.exception())  # seen, even if every caller left
            else:
                future.set_result(done.result())

        task.add_done_callback(settle)

    def feed_head(self) -> positions.Position:
        """Per shard, the last id the feed handed out: a stream that drops its window catches up to it."""
        return tuple(self.feed.head)

    def _forget(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    async def _release_slot(self, stream: Stream) -> None:
        with contextlib.suppress(aioredis.RedisError):  # the slot expires by itself
            await self.redis.zrem(routing.STREAMS_OF_USER_PREFIX + stream.user, stream.id)

    # --- the feed ------------------------------------------------------------------------------------------
    def _first_reader(self, source: Source) -> None:
        self.feed.want(source)
        metrics.LIVE_SOURCES.inc()

    def _last_reader(self, source: Source) -> None:
        self.feed.unwant(source)
        metrics.LIVE_SOURCES.dec()

    def _dispatch(self, source: Source, event: StoredEvent) -> None:
        readers = self.registry.readers_of(source)
        if not readers or event.type == "connect":
            return
        body = render(event) if event.type != "disconnect" else b""
        live = 0
        for stream in readers:
            if stream.offer(event, body):  # type: ignore[attr-defined]
                live += 1
        if event.broadcast and live:
            self.audit.broadcast(event, live, time.time())

    def _gap(self, heads: positions.Position) -> None:
        for stream in self.streams:
            stream.catch_up(heads)

    async def _tick(self) -> None:
        refresh_every = max(1, int(SLOT_TTL_SECONDS / 3 / TICK_SECONDS))
        ticks = 0
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.time()
            at_end: list[Stream] = []
            for stream in self.streams:
                try:
                    stream.tick(now)
                    if stream.renewal_due:
                        at_end.append(stream)
                except Exception:  # noqa: BLE001 - one stream must not stop the others' heartbeats
                    failed("hub-tick", "stream tick failed", stream=stream.id)
            if at_end:  # bearer streams at their token's end: renewed meanwhile (any process), or closed
                await renewal.settle(self.redis, at_end, now)
            ticks += 1
            if ticks % refresh_every == 0 and len(self.registry):
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
