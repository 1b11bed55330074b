"""One open SSE stream: replay, live loop, heartbeat, buffer limit, cleanup.

Invariants: every event the stream may see after its starting position is written once, in id order
(replay covers (Last-Event-ID, start], the hub pushes what comes after start). Whatever was queued but
not written when the stream ends is audited as dropped; the client's reconnect resumes by id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable

from django.conf import settings

from events.core import routing, sse
from events.core.audit import StreamRow, audit_text
from events.core.instance import INSTANCE
from events.core.records import CloseReason, DeliveryStatus, StoredEvent
from events.delivery.hub import Hub, render
from events.ops import metrics

logger = logging.getLogger(__name__)

BufferProbe = Callable[[], int | None]


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
    ) -> None:
        self.hub = hub
        self.id = stream_id
        self.user = user
        self.followed = set(followed)
        self.last_event_id = last_event_id
        self.expires_at = expires_at
        self._write_buffer = write_buffer
        self._abort = abort
        # Read once: settings are a lazy object, and these are read for every event.
        self._buffer_limit: int = settings.EVENTS_STREAM_BUFFER
        self._heartbeat: float = settings.EVENTS_HEARTBEAT_SECONDS
        self._renew_before: float = settings.EVENTS_TOKEN_RENEW_SECONDS
        self._expiring_sent = False  # token-expiring, once per end
        self.renewal_due = False  # at its end: the hub's ticker renews or closes it (delivery/renewal.py)
        self._pending: list[tuple[StoredEvent | None, bytes]] = []
        self._wake = asyncio.Event()
        self._close_reason: CloseReason | None = None
        self._last_write = time.time()
        self._ping_due = False
        # Cumulative byte offsets at which each written event ends, to count events the client
        # has not yet taken off the socket.
        self._unflushed_ends: deque[int] = deque()
        self._written_bytes = 0
        self.position = ""
        self.delivered = 0
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

    # --- called by the hub, in the event loop, never blocking -------------------------------------------
    def push(self, event: StoredEvent, frame: bytes) -> None:
        if self._close_reason is not None:
            return
        self._pending.append((event, frame))
        if len(self._pending) + len(self._unflushed_ends) > self._buffer_limit:
            self.close(CloseReason.SLOW_CLIENT)
        self._wake.set()

    def push_unsubscribe(self, event: StoredEvent) -> None:
        self._pending.append((None, self._unfollow(event)))
        self.position = event.id
        self._wake.set()

    def _unfollow(self, disconnect: StoredEvent) -> bytes:
        """Stop following the disconnect's process instance; the frame that tells the client."""
        assert disconnect.process_instance is not None
        self.hub.unfollow(self, disconnect.process_instance)
        self.followed.discard(disconnect.process_instance)
        return sse.control("unsubscribed", {"processInstanceUuid": disconnect.process_instance}, disconnect.id)

    def tick(self, now: float) -> None:
        expires_at = self.expires_at
        # At its end a bearer stream is not closed here: the ticker first asks Redis whether the token was
        # renewed from any web process, then calls renew() or closes the stream with auth-expired.
        self.renewal_due = expires_at is not None and now >= expires_at and self._close_reason is None
        if expires_at is not None and not self._expiring_sent and now >= expires_at - self._renew_before:
            self._expiring_sent = True
            data: dict[str, object] = {"stream": self.id, "expiresAt": sse.iso_from_ms(int(expires_at * 1000))}
            self._pending.append((None, sse.control("token-expiring", data)))
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
        metrics.OPEN_STREAMS.inc()
        reason = CloseReason.CLIENT_GONE
        try:
            start = self.hub.register(self)
            # Open from here: broadcasts handed out from now on reach this stream (the audit relies on it).
            self.record = self.record._replace(opened_at=time.time())
            self.hub.audit.opened(self.record)
            try:
                first = sse.retry(settings.EVENTS_RETRY_MS) + await self._resume(start)
            except Exception:
                reason = CloseReason.SERVER_ERROR
                raise
            yield self._written(first)
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._close_reason is not None:
                    reason = self._close_reason
                    # What is queued goes out when the server ends the stream; a client that is gone or too
                    # slow does not get it, and it is audited as dropped.
                    gone = reason in (CloseReason.SLOW_CLIENT, CloseReason.CLIENT_GONE)
                    chunk = b"" if gone else self._take()
                    if chunk:
                        yield self._written(chunk)
                    final = self._final_words(reason)
                    if final:
                        yield self._written(final)
                    if reason == CloseReason.SLOW_CLIENT and self._abort is not None:
                        self._abort()
                    return
                chunk = self._take()
                if not chunk and self._ping_due:
                    chunk = sse.PING
                self._ping_due = False
                if chunk:
                    yield self._written(chunk)
                    self._check_backlog()
        finally:
            self._finish(reason)

    async def _resume(self, start: str) -> bytes:
        self.position = start
        if not self.last_event_id:
            return sse.position(start)
        if not await self.hub.store.is_resumable(self.last_event_id):
            return sse.control("stream-reset", {"reason": "unknown or expired Last-Event-ID"}, start)
        replayed = await self.hub.store.replay(
            sources=routing.sources_for(user=self.user, process_instances=sorted(self.followed)),
            after=self.last_event_id,
            until=start,
        )
        out: list[bytes] = []
        sent: list[StoredEvent] = []
        for event in replayed:
            if event.type == "disconnect":
                if event.user == self.user and event.process_instance in self.followed:
                    out.append(self._unfollow(event))
                continue
            if routing.visible_to(
                stream_user=self.user,
                event_user=event.user,
                process_instance=event.process_instance,
                broadcast=event.broadcast,
                followed=self.followed,
            ):
                out.append(sse.frame(event.id, event.event, render(event)))
                sent.append(event)
        if sent:
            self._record(sent, DeliveryStatus.REPLAYED)
        return b"".join(out) + sse.position(start)

    def _take(self) -> bytes:
        pending, self._pending = self._pending, []
        if not pending:
            return b""
        events = [event for event, _ in pending if event is not None]
        if events:
            self._record(events, DeliveryStatus.DELIVERED)
            self.position = events[-1].id
        return b"".join(frame for _, frame in pending)

    def _record(self, events: list[StoredEvent], status: DeliveryStatus) -> None:
        now = time.time()
        if status != DeliveryStatus.DROPPED:
            self.delivered += len(events)
            self.position = events[-1].id
            for event in events:
                metrics.DELIVERY_LATENCY.observe(max(0.0, now - event.published_ms / 1000))
        self.hub.audit.delivered(self.id, events, status, now)

    def _written(self, chunk: bytes) -> bytes:
        self._last_write = time.time()
        self._written_bytes += len(chunk)
        if self._write_buffer is not None:
            self._unflushed_ends.append(self._written_bytes)
        return chunk

    def _check_backlog(self) -> None:
        """Close the stream if the client has stopped reading (bytes pile up in the server's buffer)."""
        if self._write_buffer is None:
            return
        buffered = self._write_buffer()
        if buffered is None:
            return
        flushed = self._written_bytes - buffered
        while self._unflushed_ends and self._unflushed_ends[0] <= flushed:
            self._unflushed_ends.popleft()
        if len(self._unflushed_ends) + len(self._pending) > self._buffer_limit:
            self.close(CloseReason.SLOW_CLIENT)

    def _final_words(self, reason: CloseReason) -> bytes:
        if reason == CloseReason.AUTH_EXPIRED:
            return sse.control("auth-expired", {"reason": "the bearer token expired"})
        if reason == CloseReason.SHUTDOWN:
            return sse.retry(settings.EVENTS_RETRY_MS)
        return b""

    def _finish(self, reason: CloseReason) -> None:
        dropped = [event for event, _ in self._pending if event is not None]
        self._pending.clear()
        if dropped:
            self._record(dropped, DeliveryStatus.DROPPED)
        self.hub.unregister(self)
        metrics.OPEN_STREAMS.dec()
        self.hub.audit.closed(
            self.record._replace(
                closed_at=time.time(),
                close_reason=reason,
                last_event_id=self.position[:40],
                events_delivered=self.delivered,
            )
        )
        logger.info(
            "stream closed", extra={"stream": self.id, "user": self.user, "reason": reason, "delivered": self.delivered}
        )
