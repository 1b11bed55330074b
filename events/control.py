"""Events the gateway makes itself: grant changes made in the admin reach open streams like
`connect` / `disconnect` records do, through the same event store (sync: the admin runs in a thread)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from django.conf import settings

from events.envelope import Event
from events.store import EventStore, Record

ADMIN_TOPIC = "admin"


async def _append(event: Event) -> str:
    client = aioredis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        store = EventStore(client, retention_seconds=settings.EVENTS_RETENTION_SECONDS)
        [event_id] = await store.append([Record(ADMIN_TOPIC, -1, -1, int(time.time() * 1000), event)])
        return event_id
    finally:
        await client.aclose()


def store_grant_change(*, user: str, process_instance: str, granted: bool) -> str:
    """Store a connect (granted) or disconnect event so open streams act on it; returns its id.

    Call from sync code (admin actions, services); raises redis.RedisError if Redis is down.
    """
    kind = "connect" if granted else "disconnect"
    return asyncio.run(_append(Event(kind, kind, user, process_instance, False, "null", None)))
