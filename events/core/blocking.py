"""The event store from sync code (admin actions, services, selectors), over a short-lived connection.

Grant changes made in the admin reach open streams as `connect` / `disconnect` events, through the same
store as those records from Kafka; the admin also reads back the stored event behind a delivery, and the
delivery trace finds an event by its producer id and a partition's stored offset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from django.conf import settings

from events.core import backends
from events.core.envelope import Event
from events.core.records import Record
from events.core.store import EventStore

ADMIN_TOPIC = "admin"
T = TypeVar("T")


def _with_store(action: Callable[[EventStore], Awaitable[T]], *, timeout: float) -> T:
    async def run() -> T:
        client = backends.redis_client(timeout=timeout, connect_timeout=timeout)
        try:
            store = EventStore(
                client, retention_seconds=settings.EVENTS_RETENTION_SECONDS, keyspace=backends.keyspace()
            )
            return await action(store)
        finally:
            await client.aclose()

    return asyncio.run(run())


def store_grant_change(*, user: str, process_instance: str, granted: bool) -> str:
    """Store a connect (granted) or disconnect event so open streams act on it; returns its id.

    Raises redis.RedisError if Redis is down.
    """
    kind = "connect" if granted else "disconnect"
    event = Event(kind, kind, user, process_instance, False, "null", None)

    async def append(store: EventStore) -> str:
        [event_id] = await store.append([Record(ADMIN_TOPIC, -1, -1, int(time.time() * 1000), event)])
        return event_id

    return _with_store(append, timeout=5)


def stored_event_get(*, event_id: str) -> dict[str, str] | None:
    """The event as stored in the global stream, or None once retention dropped it.

    Raises redis.RedisError when Redis cannot be reached.
    """
    return _with_store(lambda store: store.entry(event_id), timeout=2)


def stored_event_id_of_producer(*, producer_id: str) -> str | None:
    """The id of the event stored with producer id `producer_id` (its first copy), or None: none was
    within retention. Raises redis.RedisError when Redis cannot be reached."""

    return _with_store(lambda store: store.producer_event_id(producer_id), timeout=2)


def stored_offset_get(*, topic: str, partition: int) -> int:
    """The last offset of `topic` / `partition` the consumers have made durable (stored or dead-lettered);
    -1 when none. Raises redis.RedisError when Redis cannot be reached."""

    async def get(store: EventStore) -> int:
        return (await store.stored_offsets([(topic, partition)]))[(topic, partition)]

    return _with_store(get, timeout=2)
