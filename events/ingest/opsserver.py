"""The consumer's /healthz, /readyz and /metrics on CONSUMER_METRICS_PORT (a tiny asyncio HTTP server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events.core import routing
from events.ops import health, metrics

if TYPE_CHECKING:
    from events.ingest.service import IngestService

logger = logging.getLogger(__name__)


async def _audit_backlog(service: IngestService) -> None:
    if service.redis is None:
        return
    with contextlib.suppress(Exception):
        metrics.AUDIT_BATCHES_WAITING.set(await asyncio.wait_for(service.redis.xlen(routing.AUDIT_STREAM), 2))


async def serve_ops(
    service: IngestService, *, port: int | None, tasks: Callable[[], dict[str, bool]] = dict
) -> asyncio.Server | None:
    """Start serving; None when the port is 0. `tasks` names the process's other long-lived tasks and
    whether each runs (readiness is false while one does not)."""
    port = settings.CONSUMER_METRICS_PORT if port is None else port
    if not port:
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else ""
            if path == "/healthz":
                status, ctype, body = 200, "application/json", json.dumps(health.LIVE).encode()
            elif path == "/readyz":
                checks = await health.readiness(
                    redis=service.redis, kafka=service.ready and service.running and service.consumer is not None
                )
                checks.update(tasks())
                status = 200 if all(checks.values()) else 503
                assigned = len(service.consumer.assignment()) if service.ready and service.consumer else 0
                ctype = "application/json"
                body = json.dumps({**checks, "assigned_partitions": assigned}).encode()
            elif path == "/metrics":
                await _audit_backlog(service)
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest()
            else:
                status, ctype, body = 404, "application/json", b'{"error": "not found"}'
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host="0.0.0.0", port=port)  # noqa: S104 - scraped by Prometheus
    logger.info("consumer health and metrics on port %d", port)
    return server
