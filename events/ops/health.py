"""The health checks of both processes, so /readyz means the same on the web server and the consumer.

Liveness (/healthz): the process answers. Readiness (/readyz): Redis answers a PING, the database answers a
real query, and, for the consumer, it has joined its Kafka group.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.db import connection

from events.core import backends
from events.ops import metrics

LIVE = {"status": "ok"}
# A check that takes longer than this counts as failed: a probe must answer before its caller gives up.
CHECK_SECONDS = 2.0


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return True
    except Exception:  # noqa: BLE001 - any failure means not ready
        # A broken connection stays broken until closed; the next check reconnects.
        with contextlib.suppress(Exception):
            connection.close()
        return False


async def database_ok() -> bool:
    return await sync_to_async(_database_ok)()


async def redis_ok(client: aioredis.Redis | None = None) -> bool:
    """PING `client`, or a short-lived client of REDIS_URL."""
    own = client is None
    if client is None:
        client = backends.redis_client(timeout=CHECK_SECONDS, connect_timeout=CHECK_SECONDS)
    try:
        return bool(await asyncio.wait_for(client.ping(), CHECK_SECONDS + 1))
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False
    finally:
        if own:
            await client.aclose()


async def readiness(*, redis: aioredis.Redis | None = None, kafka: bool | None = None) -> dict[str, bool]:
    """Each check by name; ready when all are true. `kafka` is the consumer's own view of its group."""
    checks: dict[str, bool] = {}
    if kafka is not None:
        checks["kafka"] = kafka
    checks["redis"] = await redis_ok(redis)
    checks["database"] = await database_ok()
    for name, ok in checks.items():
        metrics.READY.labels(name).set(1 if ok else 0)
    return checks
