"""The audit writer as a child process of `run_consumer`.

Run in the consumer's own process, its inserts competed with ingestion for the GIL and delayed the
announcements of stored events: delivery p99 74 ms with audits against 39 ms without (bench/README.md).
A child process keeps the two apart. The child stops with its parent, and the parent restarts it if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from multiprocessing.process import BaseProcess

logger = logging.getLogger(__name__)

# A dead writer is noticed and restarted within this; batches wait in Redis meanwhile.
SUPERVISE_SECONDS = 5.0


class AuditWriterProcess:
    """start() / supervise() / stop(): the writer child of one consumer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process: BaseProcess | None = None

    def start(self) -> None:
        self.process = multiprocessing.get_context("spawn").Process(
            target=_child, args=(self.name, os.getpid()), name="audit-writer", daemon=True
        )
        self.process.start()

    async def supervise(self) -> None:
        """Restart the writer whenever it exits; runs until cancelled."""
        while True:
            await asyncio.sleep(SUPERVISE_SECONDS)
            if self.process is not None and not self.process.is_alive():
                logger.error("audit writer exited with %s; restarting it", self.process.exitcode)
                self.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the writer to finish the batch in hand and exit; kill it if it does not. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.is_alive():
            process.terminate()
            process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()


def _child(name: str, parent_pid: int) -> None:
    import django  # noqa: PLC0415 - a spawned process sets Django up itself

    django.setup()
    asyncio.run(_run(name, parent_pid))


async def _run(name: str, parent_pid: int) -> None:
    import redis.asyncio as aioredis  # noqa: PLC0415
    from django.conf import settings  # noqa: PLC0415

    from events.ingest.audit_sink import AuditSink  # noqa: PLC0415

    sink = AuditSink(aioredis.from_url(settings.REDIS_URL, socket_timeout=10), name=f"{name}/audit")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sink.request_stop)

    async def orphaned() -> None:
        while os.getppid() == parent_pid:  # noqa: ASYNC110 - nothing to wait on but the parent's pid
            await asyncio.sleep(1)
        sink.request_stop()

    watcher = loop.create_task(orphaned())
    try:
        await sink.run()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await sink.redis.aclose()
