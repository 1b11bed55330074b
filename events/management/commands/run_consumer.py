"""`manage.py run_consumer`: consume Kafka into the event store until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from django.core.management.base import BaseCommand

from events.audit import AuditSink
from events.hub import INSTANCE
from events.ingest import IngestService
from events.opsserver import serve_ops


class Command(BaseCommand):
    help = "Consume KAFKA_TOPICS into Redis, announce new events to the web processes, write stream audits."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--metrics-port", type=int, default=None, help="override CONSUMER_METRICS_PORT (0: off)")

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(_main(options["metrics_port"]))


async def _main(metrics_port: int | None) -> None:
    service = IngestService()
    audits = AuditSink(aioredis.from_url(settings.REDIS_URL, socket_timeout=10), name=INSTANCE)

    def stop() -> None:
        service.request_stop()
        audits.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    ops = await serve_ops(service, port=metrics_port)
    sink = loop.create_task(audits.run(), name="audit-sink")
    try:
        await service.start()
        await service.run()
    finally:
        audits.request_stop()
        await sink
        await audits.redis.aclose()
        await service.stop()
        if ops is not None:
            ops.close()
            await ops.wait_closed()
