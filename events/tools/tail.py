"""`manage.py tail_events`: print stored events as they arrive, filtered like a stream would be addressed.

Reads the global stream (EventStore.read_all) after a position, so it shows every accepted event, grants
included, whatever source it lives in. A read finding nothing waits POLL_SECONDS before the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import redis.asyncio as aioredis

from events.core import positions, sse
from events.core.records import StoredEvent
from events.core.store import EventStore, parse_id

# New events are stored within a batch time of being produced; half a second keeps a tail lively and cheap.
POLL_SECONDS = 0.5
NUMBER = re.compile(r"^[0-9]{1,15}\Z")


class BadPosition(ValueError):
    pass


@dataclass(frozen=True)
class TailFilter:
    """Which events to show: any of these users, process instances, or broadcasts; everything when empty."""

    users: frozenset[str] = field(default_factory=frozenset)
    process_instances: frozenset[str] = field(default_factory=frozenset)
    broadcast: bool = False

    def matches(self, event: StoredEvent) -> bool:
        if not (self.users or self.process_instances or self.broadcast):
            return True
        return (
            (event.user is not None and event.user in self.users)
            or (event.process_instance is not None and event.process_instance in self.process_instances)
            or (self.broadcast and event.broadcast)
        )


def position_parse(value: str) -> str | None:
    """`--from`: a store id (`<ms>-<seq>`), `0` (everything still held), epoch milliseconds, or an ISO 8601
    time (with a zone, or UTC). Returns the position to read after, or None for "from now on"."""
    value = value.strip()
    if value in ("", "now"):
        return None
    if value == "0":
        return "0-0"
    if parse_id(value) is not None:
        return value
    if NUMBER.match(value):
        ms = int(value)
    else:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadPosition(f"{value!r} is not an event id, epoch milliseconds or an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.now().astimezone().tzinfo)
        ms = int(moment.timestamp() * 1000)
    # Ids are `<ms>-<seq>`: everything stored at or after `ms` comes after the last id of the millisecond before.
    return positions.redis_id(positions.at_time(ms, 1)[0])


async def _held(store: EventStore, start: str) -> bool:
    """Whether everything after `start` is still held (a time position: whether it is within retention)."""
    place = parse_id(start)
    if place is not None:
        return await store.resume_problem((place,)) is None
    return int(start.split("-", maxsplit=1)[0]) + 1 >= (time.time() - store.retention_seconds) * 1000


def line_format(event: StoredEvent) -> str:
    """One event as one line: id, publish time, type and name, addressees, Kafka record, data."""
    whom = []
    if event.broadcast:
        whom.append("broadcast")
    if event.user is not None:
        whom.append(f"user={event.user}")
    if event.process_instance is not None:
        whom.append(f"processInstanceUuid={event.process_instance}")
    kind = event.event if event.type == "message" else event.type
    record = f"{event.kafka_topic}/{event.kafka_partition}/{event.kafka_offset}" if event.kafka_partition >= 0 else "-"
    return sse.clean(
        f"{event.id}  {sse.iso_from_ms(event.published_ms)}  {kind}  {' '.join(whom)}  {record}  {event.data_json}"
    )


def json_format(event: StoredEvent) -> str:
    return json.dumps(
        {
            "id": event.id,
            "type": event.type,
            "event": event.event,
            "user": event.user,
            "processInstanceUuid": event.process_instance,
            "broadcast": event.broadcast,
            "publishedAt": sse.iso_from_ms(event.published_ms),
            "kafka": [event.kafka_topic, event.kafka_partition, event.kafka_offset],
            "data": json.loads(event.data_json),
        },
        ensure_ascii=False,
    )


async def events_tail(
    *,
    redis_url: str,
    retention_seconds: int,
    start: str | None,
    only: TailFilter,
    write: Callable[[str], None],
    limit: int | None = None,
    as_json: bool = False,
    stop: asyncio.Event | None = None,
) -> int:
    """Write each stored event after `start` (None: from now on) that `only` matches, as it arrives, until
    `limit` were written (None: until cancelled) or `stop` is set. Returns how many were written.

    `stop` is how Ctrl-C ends a tail (manage.py tail_events): cancelling it can be lost on Python 3.11, whose
    `asyncio.wait_for` drops a cancellation that arrives as the awaited step completes (redis-py sends each
    command under `wait_for`; a tail went on after 1 Ctrl-C in 20), while a set event is always seen."""
    stop = stop or asyncio.Event()
    client = aioredis.from_url(redis_url)
    store = EventStore(client, retention_seconds=retention_seconds)
    written = 0
    try:
        position = start if start is not None else await store.last_id()
        if start is not None and not await _held(store, start):
            write(f"# {start} is older than what the store holds, or not issued yet: showing what it holds")
        render = json_format if as_json else line_format
        while (limit is None or written < limit) and not stop.is_set():
            batch = await store.read_all(position)
            for entry_id, why in batch.unreadable:
                write(f"# {entry_id}: unreadable entry ({why})")
            for event in batch.events:
                if only.matches(event) and (limit is None or written < limit):
                    write(render(event))
                    written += 1
            position = batch.last_id or position
            if not batch.full:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await stop.wait()
        return written
    finally:
        await client.aclose()
