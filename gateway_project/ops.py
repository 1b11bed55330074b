"""GET /healthz (process up), /readyz (Redis and database reachable; once streams are served, the delivery
tasks running), /metrics (Prometheus text).

Plain ASGI, routed before Django (gateway_project/asgi.py): probes and scrapers address a container by its
IP, which DJANGO_ALLOWED_HOSTS rightly does not list, so these answer on any Host header. They read nothing
from the request but its path and method.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events.delivery.hub import current_hub
from events.ops import health
from events.ops import metrics as gateway_metrics

PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def readiness() -> dict[str, bool]:
    checks = await health.readiness()
    hub = current_hub()
    if hub is not None:
        checks["delivery"] = all(hub.alive().values())
    return checks


async def ops_endpoint(scope: dict[str, Any], receive: Any, send: Send) -> None:
    path, method = scope["path"], scope["method"]
    if method not in ("GET", "HEAD"):
        await _respond(send, 405, "application/json", b'{"error": "use GET"}')
    elif path == "/healthz":
        await _respond(send, 200, "application/json", json.dumps(health.LIVE).encode())
    elif path == "/readyz":
        checks = await readiness()
        await _respond(send, 200 if all(checks.values()) else 503, "application/json", json.dumps(checks).encode())
    else:
        gateway_metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
        await _respond(send, 200, CONTENT_TYPE_LATEST, generate_latest())


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
