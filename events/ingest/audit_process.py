"""The audit writer as a child process of `run_consumer`.

Run in the consumer's own process, its inserts competed with ingestion for the GIL and delayed the
announcements of stored events: delivery p99 74 ms with audits against 39 ms without (bench/README.md).
A child process keeps the two apart. The child stops with its parent, and the parent restarts it if it dies.
The child counts what it does in memory shared with the parent, which exports the figures on its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# A dead writer is noticed and restarted within this; batches wait in Redis meanwhile.
SUPERVISE_SECONDS = 5.0


_CONTEXT = multiprocessing.get_context("spawn")
FIGURES = ("rows", "batches", "set_aside", "errors", "restarts")


class Figures:
    """Counters in shared memory: the child adds, the parent reads (they survive the child's restarts)."""

    def __init__(self) -> None:
        self.values: dict[str, Synchronized[int]] = {name: _CONTEXT.Value("q", 0) for name in FIGURES}

    def add(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            if amount:
                value = self.values[name]
                with value.get_lock():
                    value.value += amount

    def read(self) -> dict[str, int]:
        return {name: value.value for name, value in self.values.items()}


class FiguresCollector(Collector):
    """Exports a child's Figures on the parent's /metrics."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[CounterMetricFamily]:
        read = self.figures.read()
        yield CounterMetricFamily(
            "gateway_audit_rows_written", "Delivery and broadcast audit rows written to the database", read["rows"]
        )
        yield CounterMetricFamily("gateway_audit_batches_written", "Audit batches written", read["batches"])
        yield CounterMetricFamily(
            "gateway_audit_batches_set_aside", "Audit batches unreadable or refused by the database", read["set_aside"]
        )
        yield CounterMetricFamily("gateway_audit_errors", "Audit writer waits on Redis or the database", read["errors"])
        yield CounterMetricFamily("gateway_audit_writer_restarts", "Audit writer child restarts", read["restarts"])


class AuditWriterProcess:
    """start() / supervise() / stop(): the writer child of one consumer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process: BaseProcess | None = None
        self.figures = Figures()

    def start(self) -> None:
        self.process = _CONTEXT.Process(
            target=_child, args=(self.name, os.getpid(), self.figures), name="audit-writer", daemon=True
        )
        self.process.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    async def supervise(self) -> None:
        """Restart the writer whenever it exits; runs until cancelled."""
        while True:
            await asyncio.sleep(SUPERVISE_SECONDS)
            if self.process is not None and not self.process.is_alive():
                logger.error("audit writer exited with %s; restarting it", self.process.exitcode)
                self.figures.add(restarts=1)
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


def _child(name: str, parent_pid: int, figures: Any) -> None:
    import django  # noqa: PLC0415 - a spawned process sets Django up itself

    django.setup()
    asyncio.run(_run(name, parent_pid, figures))


async def _run(name: str, parent_pid: int, figures: Figures) -> None:
    from events.core import backends  # noqa: PLC0415
    from events.ingest.audit_sink import AuditSink  # noqa: PLC0415

    sink = AuditSink(backends.redis_client(timeout=10, connect_timeout=5), name=f"{name}/audit", figures=figures)
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
