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
from events.ops import metrics
from events.ops.supervise import failed


class Command(BaseCommand):
    help = "Consume KAFKA_TOPICS into Redis, announce new events to the web processes, write stream audits."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--metrics-port", type=int, default=None, help="override CONSUMER_METRICS_PORT (0: off)")

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(_main(options["metrics_port"]))


async def _consume(service: IngestService) -> None:
    """Run the consume loop until a stop is requested; a failure that escapes it (a bug) is logged, counted
    and survived: the loop starts again from the last commit, and readiness is false meanwhile."""
    delay = 1.0
    while True:
        try:
            await service.run()
            return
        except Exception:  # noqa: BLE001
            failed("consumer", "the consume loop failed; restarting it")
            metrics.TASK_RESTARTS.labels("consumer").inc()
        await asyncio.sleep(delay)
        # From what is durable; if even that fails, exit (the process restarts from the last commit) rather
        # than go on past a batch that was fetched and never stored.
        await service.rewind()
        delay = min(delay * 2, 30.0)


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
        await _consume(service)
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await asyncio.to_thread(writer.stop)
        await service.stop()
        if ops is not None:
            ops.close()
            await ops.wait_closed()
