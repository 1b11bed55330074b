"""GET /healthz (process up), /readyz (Redis and database reachable; once streams are served, the delivery
tasks running), /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio

from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events.delivery.hub import current_hub
from events.ops import health
from events.ops import metrics as gateway_metrics


async def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse(health.LIVE)


async def readyz(request: HttpRequest) -> HttpResponse:
    checks = await health.readiness()
    hub = current_hub()
    if hub is not None:
        checks["delivery"] = all(hub.alive().values())
    return JsonResponse(checks, status=200 if all(checks.values()) else 503)


async def metrics(request: HttpRequest) -> HttpResponse:
    gateway_metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
