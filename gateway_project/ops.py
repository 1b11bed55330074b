"""GET /healthz (process up), /readyz (Redis and database reachable), /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events import metrics as gateway_metrics


async def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False


async def _redis_ok() -> bool:
    client = aioredis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(await asyncio.wait_for(client.ping(), 3))
    except Exception:  # noqa: BLE001
        return False
    finally:
        await client.aclose()


async def readyz(request: HttpRequest) -> HttpResponse:
    checks = {"redis": await _redis_ok(), "database": await sync_to_async(_database_ok)()}
    return JsonResponse(checks, status=200 if all(checks.values()) else 503)


async def metrics(request: HttpRequest) -> HttpResponse:
    gateway_metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
