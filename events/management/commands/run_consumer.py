"""`manage.py run_consumer`: consume Kafka into the event store until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from django.core.management.base import BaseCommand
from prometheus_client import REGISTRY

from events.core.instance import INSTANCE
from events.ingest import audit_process
from events.ingest.opsserver import serve_ops
from events.ingest.service import IngestService


class Command(BaseCommand):
    help = "Consume KAFKA_TOPICS into Redis, announce new events to the web processes, write stream audits."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--metrics-port", type=int, default=None, help="override CONSUMER_METRICS_PORT (0: off)")

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(_main(options["metrics_port"]))


async def _main(metrics_port: int | None) -> None:
    service = IngestService()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    writer = audit_process.AuditWriterProcess(INSTANCE)
    REGISTRY.register(audit_process.FiguresCollector(writer.figures))
    ops = await serve_ops(service, port=metrics_port, tasks=lambda: {"audit_writer": writer.alive()})
    writer.start()
    supervisor = loop.create_task(writer.supervise(), name="audit-writer-supervisor")
    try:
        await service.start()
        await service.run()
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await asyncio.to_thread(writer.stop)
        await service.stop()
        if ops is not None:
            ops.close()
            await ops.wait_closed()
