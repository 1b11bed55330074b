"""The live feed of one web process: subscribes to exactly the sources its streams read, hands out what
arrives, and says when continuity was lost.

The store's append script publishes every event on its source's channel in the same atomic step that makes
it durable (events.core.store). The feed keeps one subscriber connection per Redis node (one on a single
Redis; one per master on a cluster, with sharded pub/sub) and subscribes to a source when the registry says
a stream of this process needs it. Pub/sub carries events in id order per shard and loses nothing while the
connection lives; what it cannot promise is handled by position, never by trust:

- A stream waits until its sources' subscriptions are confirmed, then reads the store's heads: everything
  up to them comes from the store, everything after them through the feed (events.delivery.stream).
- A subscriber connection that fails (Redis restarted, output buffer limit, slot moved) is replaced, its
  channels subscribed again, and every stream told to catch up from the store to the new heads (`on_gap`).

`head` is, per shard, the highest id handed out so far: every event above it not yet handed out is still
to come through the feed, which is what a stream that drops its in-memory window catches up to.

A subscriber connection is opened by redis-py (address, TLS, authentication, database) and then read by the
feed itself: what arrives is fed to a hiredis reader and every complete reply handed out in one pass, so a
read that brings a hundred messages costs one wake-up, not a hundred (redis-py's PubSub awaits, times and
wraps each message on its own; at thousands of events a second that was a fifth of a web process's CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import hiredis
from redis.crc import key_slot

from events.core import positions
from events.core.positions import Position
from events.core.records import StoredEvent
from events.core.routing import Source
from events.core.store import EventStore
from events.ops import metrics
from events.ops.supervise import cancel_and_wait, failed

logger = logging.getLogger(__name__)

# A subscriber connection that failed is replaced after this (doubling up to RECONNECT_MAX_SECONDS).
RECONNECT_SECONDS = 0.2
RECONNECT_MAX_SECONDS = 5.0
# Connecting (or closing) a subscriber connection may take this long before it counts as failed.
CONNECT_SECONDS = 5.0
# A subscriber connection quiet for this long is pinged; no answer within as long again means it is gone.
QUIET_SECONDS = 5.0
# A source no stream reads stays subscribed this long (a client reconnecting at once finds it live).
UNSUBSCRIBE_AFTER_SECONDS = 10.0
# Channels per SUBSCRIBE command when many streams open at once.
SUBSCRIBE_BATCH = 1000


class _Link:
    """One subscriber connection to one Redis node and the channels subscribed on it."""

    def __init__(self, feed: Feed, name: str, client: Any) -> None:
        self.feed = feed
        self.name = name
        self.client = client
        self.connection: Any = None  # redis-py's connection while a session lasts
        self.channels: set[str] = set()  # wanted on this node
        self.live: set[str] = set()  # confirmed by the server, no unsubscribe sent since
        self._outstanding: dict[str, int] = {}  # subscribe commands sent, not yet confirmed
        self._changed = asyncio.Event()
        self._to_subscribe: set[str] = set()
        self._idle_since: dict[str, float] = {}  # subscribed, no longer wanted, since
        self._unsubscribing: dict[str, int] = {}  # unsubscribe commands sent, not yet confirmed
        self.connected = asyncio.Event()
        self._progress = asyncio.Event()  # set on each confirmation
        self._heard = False  # anything read since the watch last looked

    def want(self, channel: str) -> None:
        self.channels.add(channel)
        self._idle_since.pop(channel, None)
        if channel not in self.live and not self._outstanding.get(channel):
            self._to_subscribe.add(channel)
            self._changed.set()

    def unwant(self, channel: str) -> None:
        """No stream reads `channel` any more; it is unsubscribed if none does for UNSUBSCRIBE_AFTER_SECONDS
        (a client reconnecting at once finds it live)."""
        self.channels.discard(channel)
        self._to_subscribe.discard(channel)
        self._idle_since[channel] = time.monotonic()

    async def run(self) -> None:
        """Connect, subscribe, read; on any failure start over with a new connection and report the gap."""
        delay = RECONNECT_SECONDS
        first = True
        while True:
            try:
                await self._session(resumed=not first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the feed must outlive any failure of its connection
                logger.warning(
                    "live feed connection to %s lost (%r); streams catch up from the store",
                    self.name,
                    exc,
                    extra={"node": self.name},
                )
                metrics.BACKEND_ERRORS.labels("redis").inc()
            finally:
                self.connected.clear()
                self.live.clear()
                self._outstanding.clear()
                self._unsubscribing.clear()
                if self.connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.connection.disconnect(), CONNECT_SECONDS)
                    self.connection = None
            first = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _session(self, *, resumed: bool) -> None:
        # A connection of the node's pool's kind, never returned to the pool: it is the feed's alone.
        self.connection = self.client.connection_pool.make_connection()
        await asyncio.wait_for(self.connection.connect(), CONNECT_SECONDS)
        replies = _Replies(self)
        replies.take_over(self.connection)
        self._to_subscribe = set(self.channels)
        self._idle_since.clear()
        await self._send()
        loop = asyncio.get_running_loop()
        tasks = {
            loop.create_task(replies.ended(), name=f"feed-read:{self.name}"),
            loop.create_task(self._sender(), name=f"feed-send:{self.name}"),
            loop.create_task(self._watch(), name=f"feed-watch:{self.name}"),
        }
        if resumed:
            tasks.add(loop.create_task(self._caught_up(), name=f"feed-resume:{self.name}"))
        else:
            self.connected.set()
        try:
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a failure of any part ends the session
                    if task.get_name().startswith("feed-read"):
                        raise ConnectionError("the subscriber connection ended")
        finally:
            await cancel_and_wait(tasks)
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _caught_up(self) -> None:
        """After a reconnect: once every wanted channel is confirmed again, streams catch up past the gap."""
        while not self.channels <= self.live:
            self._progress.clear()
            await self._progress.wait()
        await self.feed.gap()
        self.connected.set()

    async def _sender(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), UNSUBSCRIBE_AFTER_SECONDS / 2)
            self._changed.clear()
            await self._send()

    async def _send(self) -> None:
        subscribe, unsubscribe = self.feed.commands
        pending = sorted(self._to_subscribe)
        self._to_subscribe.clear()
        for batch in self.feed.batches(pending):
            for channel in batch:
                self._outstanding[channel] = self._outstanding.get(channel, 0) + 1
            await self._command(subscribe, *batch)
        cutoff = time.monotonic() - UNSUBSCRIBE_AFTER_SECONDS
        leaving = sorted(c for c, since in self._idle_since.items() if since <= cutoff and c not in self.channels)
        for channel in leaving:
            del self._idle_since[channel]
            self.live.discard(channel)
            self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
        for batch in self.feed.batches(leaving):
            await self._command(unsubscribe, *batch)

    async def _command(self, *args: str) -> None:
        connection = self.connection
        await connection.send_packed_command(connection.pack_command(*args), check_health=False)

    async def _watch(self) -> None:
        """A connection quiet for QUIET_SECONDS is pinged (a silent one would never say it is gone); quiet for
        as long again, it is given up. One timer for the connection, not one per read."""
        pinged = False
        while True:
            self._heard = False
            await asyncio.sleep(QUIET_SECONDS)
            if self._heard:
                pinged = False
            elif pinged:
                raise ConnectionError(f"no answer to a ping within {QUIET_SECONDS:.0f}s")
            else:
                await self._command("PING")
                pinged = True

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(f"the server refused a subscriber command: {reply}")
        if not isinstance(reply, list) or len(reply) < 3:
            return  # a ping's answer
        feed = self.feed
        kind = reply[0]
        if kind == feed.message_type:
            feed.deliver(reply[1], reply[2])
        elif kind == feed.confirm_type:
            self._confirmed(_text(reply[1]))
        elif kind == feed.unsubscribe_type:
            channel = _text(reply[1])
            asked = self._unsubscribing.get(channel, 0)
            if asked > 1:
                self._unsubscribing[channel] = asked - 1
            elif asked == 1:
                del self._unsubscribing[channel]
            elif channel in self.channels:
                # Not asked for (on a cluster: its slot moved to another node): start over.
                raise ConnectionError(f"the server dropped the subscription to {channel}")

    def _confirmed(self, channel: str) -> None:
        left = self._outstanding.get(channel, 0) - 1
        if left > 0:
            self._outstanding[channel] = left
            return
        self._outstanding.pop(channel, None)
        if channel in self.channels or channel in self._idle_since:
            self.live.add(channel)
            self.feed.confirmed(channel)
            self._progress.set()


class _Replies(asyncio.Protocol):
    """Reads a subscriber connection in place of redis-py (see the module docstring): the connection's
    transport hands each read to `data_received`, which parses it with hiredis and hands out every complete
    reply at once, without a reader task to wake. Writes still go through redis-py's connection."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._reader = hiredis.Reader()
        self._end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        # redis-py's protocol: still told of flow control and of the end, which its writer waits on to close.
        self._original: Any = None

    def take_over(self, connection: Any) -> None:
        """Become the protocol of `connection`'s transport, right after it connected (nothing is unread)."""
        transport = connection._writer.transport
        unread = bytes(connection._reader._buffer)  # the handshake's replies are all read: empty
        self._transport = transport
        self._original = transport.get_protocol()
        transport.set_protocol(self)
        if unread:
            self.data_received(unread)

    async def ended(self) -> None:
        """Wait until the connection ends; raise why."""
        await self._end

    def data_received(self, data: bytes) -> None:
        link = self._link
        feed = link.feed
        link._heard = True
        if self._end.done():
            return
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                link._reply(reply)
        except Exception as exc:  # noqa: BLE001 - a reply the feed cannot accept ends the connection
            self._ended(exc)
        finally:
            if feed.heard:  # counted per read, not per event
                feed.heard_total.inc(feed.heard)
                feed.heard = 0

    def eof_received(self) -> bool:
        self._ended(ConnectionError("the server closed the subscriber connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(ConnectionError(f"the subscriber connection was lost: {exc!r}"))
        if self._original is not None:
            self._original.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._original is not None:
            self._original.pause_writing()

    def resume_writing(self) -> None:
        if self._original is not None:
            self._original.resume_writing()

    def _ended(self, exc: Exception) -> None:
        if not self._end.done():
            self._end.set_exception(exc)
            self._end.add_done_callback(lambda f: f.exception())  # seen, even if nobody awaits it any more
        if self._transport is not None:
            self._transport.close()


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class Feed:
    """Live events of the sources this process's streams read (see the module docstring)."""

    def __init__(
        self,
        *,
        store: EventStore,
        nodes: Callable[[str], tuple[str, Any]],
        sharded: bool,
        dispatch: Callable[[Source, StoredEvent], None],
        on_gap: Callable[[Position], None],
    ) -> None:
        """`nodes(channel)` names the node serving a channel and gives a client of it; `dispatch` is called
        with each live event; `on_gap(heads)` when continuity was lost and streams must catch up."""
        self.store = store
        self._nodes = nodes
        self._dispatch = dispatch
        self._on_gap = on_gap
        self._sharded = sharded
        self.commands = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        # Reply kinds as the feed's reader gives them (bytes).
        self.message_type = b"smessage" if sharded else b"message"
        self.confirm_type = b"ssubscribe" if sharded else b"subscribe"
        self.unsubscribe_type = b"sunsubscribe" if sharded else b"unsubscribe"
        self.head: list[positions.Id] = [positions.ZERO] * store.shards
        self._sources: dict[bytes, Source] = {}  # by channel name as the reader gives it
        self._links: dict[str, _Link] = {}
        self._link_of: dict[str, _Link] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.heard = 0  # live events of this process's sources in the current read, not yet counted
        self.heard_total = metrics.LIVE_EVENTS

    # --- subscriptions ------------------------------------------------------------------------------
    def batches(self, channels: list[str]) -> list[list[str]]:
        """Channels in groups one command may carry: on a cluster, one hash slot per command."""
        if not self._sharded:
            return [channels[i : i + SUBSCRIBE_BATCH] for i in range(0, len(channels), SUBSCRIBE_BATCH)]
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        return list(by_slot.values())

    def want(self, source: Source) -> None:
        self._sources[source.key.encode()] = source
        self._link(source.key).want(source.key)

    def unwant(self, source: Source) -> None:
        self._sources.pop(source.key.encode(), None)
        link = self._link_of.pop(source.key, None)
        if link is not None:
            link.unwant(source.key)

    def is_live(self, source: Source) -> bool:
        link = self._link_of.get(source.key)
        return link is not None and source.key in link.live

    async def ready(self, sources: Iterable[Source]) -> None:
        """Return once every source's subscription is confirmed (events after this come through the feed)."""
        waiting = []
        for source in sources:
            if not self.is_live(source):
                future = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(source.key, []).append(future)
                waiting.append(future)
        if len(waiting) == 1:
            await waiting[0]
        elif waiting:
            await asyncio.gather(*waiting)

    def confirmed(self, channel: str) -> None:
        for future in self._waiters.pop(channel, ()):
            if not future.done():
                future.set_result(None)

    def _link(self, channel: str) -> _Link:
        link = self._link_of.get(channel)
        if link is not None:
            return link
        name, client = self._nodes(channel)
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = _Link(self, name, client)
            self._tasks[name] = asyncio.get_running_loop().create_task(link.run(), name=f"feed:{name}")
        self._link_of[channel] = link
        return link

    # --- events -------------------------------------------------------------------------------------
    def deliver(self, channel: bytes, message: bytes) -> None:
        source = self._sources.get(channel)
        if source is None:
            return  # unsubscribed since it was sent
        self.heard += 1
        event = self.store.decode_live(source, message)
        if event is None:
            metrics.TASK_FAILURES.labels("hub-feed").inc()
            logger.error("skipping an unreadable live event", extra={"channel": source.key})
            return
        self.head[event.shard] = max(self.head[event.shard], event.place)
        try:
            self._dispatch(source, event)
        except Exception:  # noqa: BLE001 - one event must not stop delivery to everyone
            failed("hub-feed", "could not hand out a live event; streams catch up from the store", event_id=event.id)

    async def gap(self) -> None:
        """Continuity was lost: every stream catches up from the store to the heads read now."""
        heads = await self.store.heads()
        self.head = [max(a, b) for a, b in zip(self.head, heads, strict=True)]
        self._on_gap(heads)

    def alive(self) -> bool:
        return all(not task.done() for task in self._tasks.values())

    def connected(self) -> bool:
        return all(link.connected.is_set() for link in self._links.values())

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        await cancel_and_wait(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()
        self._waiters.clear()
