"""One open SSE stream: where it starts, catching up from the store, live events, backpressure, cleanup.

A stream is always in one of two states:

- catching up to a target position: it reads the store, a page at a time, from its position to the target,
  while live events above the target collect in its in-memory window;
- live: it writes what the feed offers, in order.

It starts by catching up from its resume point (Last-Event-ID, `since`, or nowhere) to the store's heads read
once its sources' subscriptions are live, so nothing falls between the replay and the feed. A window that
outgrows EVENTS_STREAM_BUFFER events or WINDOW_BYTES (a burst, or a client reading slower than events
arrive) is dropped and the stream catches up to the feed's head instead: a burst costs a detour through the
store, never the stream.
Only a client whose socket stops draining (EVENTS_SLOW_CLIENT_SECONDS without progress, or more than
EVENTS_SLOW_CLIENT_BYTES unread without progress) is closed; it resumes by id.

Invariants: every event the stream may see (routing.visible_to, the one rule for live and replayed events)
after its starting position is written once, in id order per shard; the position after each written event is
its SSE id (events.core.positions). Whatever was in the window but not written when the stream ends is
audited as dropped; the client's reconnect resumes by id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING

from django.conf import settings

from events.core import positions, routing, sse
from events.core.audit import StreamRow, audit_text
from events.core.instance import INSTANCE
from events.core.positions import Position
from events.core.records import CloseReason, DeliveryStatus, StoredEvent
from events.core.routing import Source
from events.ops import metrics
from events.ops.supervise import failed

if TYPE_CHECKING:
    from events.delivery.hub import Hub

logger = logging.getLogger(__name__)

BufferProbe = Callable[[], int | None]
SendNow = Callable[[bytes], bool]
# Write more only while the server holds less than this for the client; bytes a chunk aims at.
HIGH_WATER = 1024 * 1024
CHUNK_BYTES = 256 * 1024
# How often a stream whose client is not reading looks at its socket again.
DRAIN_POLL_SECONDS = 0.01
# A window holding more than this (besides more than EVENTS_STREAM_BUFFER events) is dropped for the store:
# what one stalled client can hold in memory, whatever the size of the events.
WINDOW_BYTES = 4 * 1024 * 1024
# More than EVENTS_SLOW_CLIENT_BYTES unread closes the client only if it also made no progress for this long.
BYTES_GRACE_SECONDS = 1.0


def render(event: StoredEvent) -> bytes:
    """An event's SSE body (event and data lines); the stream adds its id line."""
    return sse.body(
        event.event,
        sse.payload(
            data_json=event.data_json,
            process_instance=event.process_instance,
            user=event.user,
            broadcast=event.broadcast,
            published_ms=event.published_ms,
        ),
    )


class Stream:
    def __init__(
        self,
        *,
        hub: Hub,
        stream_id: str,
        user: str,
        followed: list[str],
        auth_method: str,
        last_event_id: str | None,
        expires_at: float | None,
        client_address: str,
        user_agent: str,
        write_buffer: BufferProbe | None = None,
        abort: Callable[[], None] | None = None,
        send_now: SendNow | None = None,
        since_ms: int | None = None,
    ) -> None:
        self.hub = hub
        self.id = stream_id
        self.user = user
        self.followed = set(followed)
        self.last_event_id = last_event_id
        self.since_ms = since_ms
        self.expires_at = expires_at
        self._write_buffer = write_buffer
        self._abort = abort
        self._send_now = send_now
        # The body is waiting for live events with everything before written: the next one may go straight
        # to the socket from offer() (the server adapter writes it only if nothing is queued before it).
        self._parked = False
        keys = hub.store.keys
        self._shards = hub.store.shards
        self._source_of_process = {p: keys.process_source(p) for p in self.followed}
        self._sources = set(keys.sources_for(user=user, process_instances=self.followed))
        # Read once: settings are a lazy object, and these are read for every event.
        self._buffer_limit: int = settings.EVENTS_STREAM_BUFFER
        self._heartbeat: float = settings.EVENTS_HEARTBEAT_SECONDS
        self._slow_bytes: int = settings.EVENTS_SLOW_CLIENT_BYTES
        self._slow_seconds: float = settings.EVENTS_SLOW_CLIENT_SECONDS
        # Where the stream is: every event it may see up to here has been written (or is being replayed).
        self.position: list[positions.Id] = [positions.ZERO] * self._shards
        # While catching up: where to. Live events at or below it are left to the replay.
        self._target: Position | None = None
        self._floor: list[positions.Id] = self.position
        self._window: deque[tuple[StoredEvent, bytes]] = deque()
        self._window_bytes = 0
        self._renew_before: float = settings.EVENTS_TOKEN_RENEW_SECONDS
        self._expiring_sent = False  # token-expiring, once per end
        self.renewal_due = False  # at its end: the hub's ticker renews or closes it (delivery/renewal.py)
        self._notices: list[bytes] = []  # gateway events to write next (token-expiring)
        self._wake = asyncio.Event()
        self._close_reason: CloseReason | None = None
        self._last_write = time.time()
        self._ping_due = False
        self.delivered = 0
        self.catch_ups = 0  # times the window was dropped for the store
        # The stream's audit row; opened_at is set on registration and the end fields on close.
        self.record = StreamRow(
            id=stream_id,
            user=user,
            process_instances=sorted(followed),
            auth_method=auth_method,
            opened_at=time.time(),
            resumed_from=audit_text(last_event_id or "", 40),
            client_address=client_address[:64],
            user_agent=user_agent[:512],
            instance=INSTANCE[:128],
            closed_at=None,
            close_reason="",
            last_event_id="",
            events_delivered=0,
        )

    # --- what the registry and the feed see -----------------------------------------------------------
    @property
    def sources(self) -> set[Source]:
        return self._sources

    @property
    def live(self) -> bool:
        return self._target is None and self._close_reason is None

    def offer(self, event: StoredEvent, body: bytes) -> bool:
        """A live event of one of this stream's sources, in id order per shard; True if kept for writing."""
        if self._close_reason is not None or event.place <= self._floor[event.shard]:
            return False
        if event.type != "disconnect":
            if not self.may_see(event):
                return False
            if self._parked and not self._wake.is_set() and self._write_now(event, body):
                return True
        self._window.append((event, body))
        self._window_bytes += len(body)
        if len(self._window) > self._buffer_limit or self._window_bytes > WINDOW_BYTES:
            # Too far behind to hold in memory: the store has it all. Catch up to what the feed has handed out.
            self._window.clear()
            self._window_bytes = 0
            self.catch_ups += 1
            metrics.STREAM_CATCH_UPS.inc()
            self._catch_up(tuple(self.hub.feed_head()))
        self._wake.set()
        return True

    def _write_now(self, event: StoredEvent, body: bytes) -> bool:
        """A live event the stream may see, written at once while the body waits (see offer); False, having
        changed nothing, if it must go through the window instead."""
        send_now = self._send_now
        position = self.position
        before = position[event.shard]
        if send_now is None or event.place <= before:
            return False
        position[event.shard] = event.place
        try:
            written = send_now(sse.id_line(self._id_of(event)) + body)
        except Exception:  # noqa: BLE001 - the server adapter failed: this stream writes through its body only
            failed("hub-feed", "writing a live event straight to the socket failed", stream=self.id)
            self._send_now = written = None
        if not written:
            position[event.shard] = before
            return False
        self._last_write = now = time.time()
        self._record([event], DeliveryStatus.DELIVERED, now)
        return True

    def may_see(self, event: StoredEvent) -> bool:
        return routing.visible_to(
            stream_user=self.user,
            event_user=event.user,
            process_instance=event.process_instance,
            broadcast=event.broadcast,
            followed=self.followed,
        )

    def catch_up(self, target: Position) -> None:
        """Continuity of the feed was lost: take everything up to `target` from the store."""
        if self._close_reason is None:
            self._catch_up(target)
            self._wake.set()

    def _catch_up(self, target: Position) -> None:
        self._target = target if self._target is None else positions.later(self._target, target)
        self._floor = list(positions.later(tuple(self.position), self._target))
        # What the window holds at or below the target is replayed in order instead.
        while self._window and self._window[0][0].place <= self._floor[self._window[0][0].shard]:
            self._window_bytes -= len(self._window.popleft()[1])

    def tick(self, now: float) -> None:
        expires_at = self.expires_at
        # At its end a bearer stream is not closed here: the ticker first asks Redis whether the token was
        # renewed from any web process, then calls renew() or closes the stream with auth-expired.
        self.renewal_due = expires_at is not None and now >= expires_at and self._close_reason is None
        if expires_at is not None and not self._expiring_sent and now >= expires_at - self._renew_before:
            self._expiring_sent = True
            data: dict[str, object] = {"stream": self.id, "expiresAt": sse.iso_from_ms(int(expires_at * 1000))}
            self._notices.append(sse.control("token-expiring", data))
            self._wake.set()
        elif now - self._last_write >= self._heartbeat:
            self._ping_due = True
            self._wake.set()

    def renew(self, expires_at: float) -> None:
        """Move a bearer stream's end to a renewed token's exp (never earlier); token-expiring is sent again
        before the new end."""
        if self.expires_at is not None and expires_at > self.expires_at:
            self.expires_at = expires_at
            self._expiring_sent = False
        self.renewal_due = False

    def close(self, reason: CloseReason) -> None:
        if self._close_reason is None:
            self._close_reason = reason
            self._wake.set()

    # --- the response body -------------------------------------------------------------------------------
    async def body(self) -> AsyncGenerator[bytes, None]:
        """The response body. The first item (retry, any stream-reset, the first page of a replay) is ready
        before the response starts; a failure before it is the caller's to answer with a retry."""
        metrics.OPEN_STREAMS.inc()
        reason = CloseReason.CLIENT_GONE
        replay: AsyncIterator[list[StoredEvent]] | None = None
        replay_target: Position | None = None
        try:
            try:
                first = sse.retry(settings.EVENTS_RETRY_MS) + await self._open()
            except Exception:
                reason = CloseReason.SERVER_ERROR
                raise
            while True:
                if self._close_reason is not None:
                    reason = self._close_reason
                    async for chunk in self._last_words(reason):
                        yield chunk
                    return
                chunk = b""
                if self._target is not None:
                    if replay is None or replay_target != self._target:
                        replay_target = self._target
                        replay = self.hub.store.replay_pages(
                            sources=list(self._sources), after=tuple(self.position), until=replay_target
                        )
                    page = await anext(replay, None)
                    if page is not None:
                        chunk = self._replayed(page)
                    elif replay_target == self._target:
                        replay = None
                        chunk = self._caught_up(replay_target)
                    chunk = self._take_notices() + chunk
                else:
                    chunk = self._take_notices() + self._take()
                    if not chunk and not first:
                        if self._ping_due:
                            chunk = sse.PING
                        else:
                            # Everything so far is written (the server asks for the next piece only after
                            # sending the last): offer() may write live events itself meanwhile.
                            self._parked = True
                            try:
                                await self._wake.wait()
                            finally:
                                self._parked = False
                            self._wake.clear()
                            continue
                self._ping_due = False
                if first:
                    chunk, first = first + chunk, b""
                for piece in _pieces(chunk):
                    yield self._written(piece)
                    await self._drain()
        finally:
            self._finish(reason)

    async def _open(self) -> bytes:
        """Register, wait for the live feed, and decide where to start; what the client gets first."""
        await self.hub.attach(self)
        self.record = self.record._replace(opened_at=time.time())
        self.hub.audit.opened(self.record)
        heads = await self.hub.fresh_heads()
        start: Position = heads
        notice = b""
        if self.last_event_id:
            resumed = positions.decode(self.last_event_id, self._shards)
            problem = "unknown-id" if resumed is None else await self.hub.store.resume_problem(resumed)
            if resumed is not None and problem is None:
                start = resumed
            else:
                notice = await self._reset(problem or "unknown-id", heads)
        elif self.since_ms is not None:
            start = positions.at_time(self.since_ms, self._shards)
        self.position = list(start)
        self._floor = self.position
        if start != heads:
            self._catch_up(heads)
            return notice
        return notice + sse.position(positions.encode(heads))

    async def _reset(self, reason: str, heads: Position) -> bytes:
        oldest = await self.hub.store.oldest_ms()
        data: dict[str, object] = {
            "reason": reason,
            "oldest": sse.iso_from_ms(oldest) if oldest is not None else None,
        }
        return sse.control("stream-reset", data, positions.encode(heads))

    def _replayed(self, page: list[StoredEvent]) -> bytes:
        out: list[bytes] = []
        sent: list[StoredEvent] = []
        position = self.position
        for event in page:
            position[event.shard] = max(position[event.shard], event.place)
            frame = self._frame(event, None)
            if frame:
                out.append(frame)
                if event.type != "disconnect":
                    sent.append(event)
        if sent:
            self._record(sent, DeliveryStatus.REPLAYED)
        return b"".join(out)

    def _caught_up(self, target: Position) -> bytes:
        """The replay reached `target`: go live with what the window holds above it."""
        self.position = list(positions.later(tuple(self.position), target))
        self._floor = self.position
        self._target = None
        return self._take() or sse.position(positions.encode(tuple(self.position)))

    def _take_notices(self) -> bytes:
        notices, self._notices = self._notices, []
        return b"".join(notices)

    def _take(self) -> bytes:
        if not self._window:
            return b""
        out: list[bytes] = []
        sent: list[StoredEvent] = []
        size = 0
        position = self.position
        while self._window and size < CHUNK_BYTES:
            event, body = self._window.popleft()
            self._window_bytes -= len(body)
            if event.place <= position[event.shard]:
                continue
            position[event.shard] = event.place
            frame = self._frame(event, body)
            if frame:
                out.append(frame)
                size += len(frame)
                if event.type != "disconnect":
                    sent.append(event)
        if self._window:
            self._wake.set()
        if sent:
            self._record(sent, DeliveryStatus.DELIVERED)
        return b"".join(out)

    def _frame(self, event: StoredEvent, body: bytes | None) -> bytes:
        """The bytes for one event at the stream's current position (already moved past it), or b"" if the
        stream may not see it. A disconnect of a followed process instance ends following it."""
        if event.type == "connect":
            return b""
        if event.type == "disconnect":
            if event.user != self.user or event.process_instance not in self.followed:
                return b""
            assert event.process_instance is not None
            self._unfollow(event.process_instance)
            return sse.control("unsubscribed", {"processInstanceUuid": event.process_instance}, self._id_of(event))
        if not self.may_see(event):
            return b""
        return sse.id_line(self._id_of(event)) + (body if body is not None else render(event))

    def _id_of(self, event: StoredEvent) -> str:
        return event.id if self._shards == 1 else positions.encode(tuple(self.position))

    def _unfollow(self, process_instance: str) -> None:
        self.followed.discard(process_instance)
        source = self._source_of_process.pop(process_instance, None)
        if source is not None:
            self._sources.discard(source)
            self.hub.unfollow(self, source)

    def _record(self, events: list[StoredEvent], status: DeliveryStatus, now: float | None = None) -> None:
        if now is None:
            now = time.time()
        if status != DeliveryStatus.DROPPED:
            self.delivered += len(events)
            for event in events:
                metrics.DELIVERY_LATENCY.observe(max(0.0, now - event.published_ms / 1000))
        self.hub.audit.delivered(self.id, events, status, now)

    def _written(self, chunk: bytes) -> bytes:
        self._last_write = time.time()
        return chunk

    async def _drain(self) -> None:
        """Wait while the client has a lot unread; close it if its socket stops draining."""
        if self._write_buffer is None:
            return
        buffered = self._write_buffer()
        if buffered is None or buffered <= HIGH_WATER:
            return
        last, progress_at = buffered, time.monotonic()
        while buffered is not None and buffered > HIGH_WATER and self._close_reason is None:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
            buffered = self._write_buffer()
            now = time.monotonic()
            if buffered is None or buffered < last:
                last, progress_at = buffered or 0, now
                continue
            stalled = now - progress_at
            if stalled >= self._slow_seconds or (buffered > self._slow_bytes and stalled >= BYTES_GRACE_SECONDS):
                self.close(CloseReason.SLOW_CLIENT)

    async def _last_words(self, reason: CloseReason) -> AsyncIterator[bytes]:
        # What is in the window goes out when the server ends the stream; a client that is gone or too slow
        # does not get it, and it is audited as dropped.
        if reason not in (CloseReason.SLOW_CLIENT, CloseReason.CLIENT_GONE) and self._target is None:
            chunk = self._take()
            while chunk:
                yield self._written(chunk)
                chunk = self._take()
        final = self._final_words(reason)
        if final:
            yield self._written(final)
        if reason == CloseReason.SLOW_CLIENT and self._abort is not None:
            self._abort()

    def _final_words(self, reason: CloseReason) -> bytes:
        if reason == CloseReason.AUTH_EXPIRED:
            return sse.control("auth-expired", {"reason": "the bearer token expired"})
        if reason == CloseReason.SHUTDOWN:
            return sse.retry(settings.EVENTS_RETRY_MS)
        return b""

    def _finish(self, reason: CloseReason) -> None:
        dropped = [event for event, _ in self._window if event.type != "disconnect" and self.may_see(event)]
        self._window.clear()
        self._window_bytes = 0
        if dropped:
            self._record(dropped, DeliveryStatus.DROPPED)
        self.hub.detach(self)
        metrics.OPEN_STREAMS.dec()
        last = positions.encode(tuple(self.position)) if any(self.position) else ""
        self.hub.audit.closed(
            self.record._replace(
                closed_at=time.time(),
                close_reason=reason,
                last_event_id=audit_text(last, 40),
                events_delivered=self.delivered,
            )
        )
        logger.info(
            "stream closed", extra={"stream": self.id, "user": self.user, "reason": reason, "delivered": self.delivered}
        )


def _pieces(chunk: bytes) -> list[bytes]:
    """A large chunk (a replay page) in parts of about CHUNK_BYTES, so the socket's buffer is checked between."""
    if len(chunk) <= CHUNK_BYTES:
        return [chunk] if chunk else []
    return [chunk[i : i + CHUNK_BYTES] for i in range(0, len(chunk), CHUNK_BYTES)]
