"""Prometheus metrics shared by the web and consumer processes (CONTRACT section 7)."""

from __future__ import annotations

import bisect
import math
import platform
from collections.abc import Iterator
from typing import Any

import django
from django.db.backends.signals import connection_created
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class LoopHistogram(Collector):
    """A histogram observed from one thread only (the web process's event loop), once per delivery: plain
    counts, no lock (prometheus_client's Histogram takes a lock and walks its buckets per observation, a
    measurable share of a delivery's CPU). Scraped as a histogram like any other."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        REGISTRY.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self._counts), self._sum  # a consistent enough copy: scrapes may run on a thread
        buckets, cumulative = [], 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)


# The release, as pyproject.toml's [project] version says (tests/test_observability.py keeps them equal).
VERSION = "0.1.0"

EVENTS_CONSUMED = Counter("gateway_events_consumed", "Kafka records accepted and stored", ["topic", "type"])
EVENTS_DUPLICATE = Counter(
    "gateway_events_duplicate", "Accepted records not stored again (producer id seen before)", ["topic"]
)
EVENTS_REJECTED = Counter("gateway_events_rejected", "Kafka records sent to the dead-letter topic", ["topic", "reason"])
CONSUMER_LAG = Gauge(
    "gateway_consumer_lag", "Records behind the partition's end after the last batch", ["topic", "partition"]
)
CONSUMER_BATCH_SECONDS = Histogram("gateway_consumer_batch_seconds", "Time to make one batch durable")
BACKEND_ERRORS = Counter("gateway_backend_errors", "Failed calls to a backing service", ["backend"])

DELIVERIES = Counter("gateway_deliveries", "Events written to streams, by outcome", ["status"])
OPEN_STREAMS = Gauge("gateway_open_streams", "SSE streams open in this process")
STREAMS_REFUSED = Counter("gateway_streams_refused", "Stream requests refused before opening", ["status"])
AUDIT_BATCH_SECONDS = Histogram("gateway_audit_batch_seconds", "Time to write one batch of stream audits")
ASYNCIO_TASKS = Gauge("gateway_asyncio_tasks", "Tasks alive in the web process's event loop")
DELIVERY_LATENCY = LoopHistogram(
    "gateway_delivery_latency_seconds",
    "Kafka record timestamp to bytes written on the stream",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TASK_FAILURES = Counter(
    "gateway_task_failures", "Failures a long-lived task survived (the item set aside, or the task restarted)", ["task"]
)
TASK_RESTARTS = Counter("gateway_task_restarts", "Long-lived tasks restarted after they failed", ["task"])
AUDIT_BATCHES_WAITING = Gauge("gateway_audit_batches_waiting", "Audit batches in Redis not yet written (consumer)")
READY = Gauge(
    "gateway_ready", "1 if the check passed at the last /readyz probe, 0 if it failed (absent before one)", ["check"]
)
DATABASE_QUERIES = Counter("gateway_database_queries", "SQL statements the web process sent to the database")
BUILD = Info("gateway_build", "The running release and the Python and Django it runs on")
BUILD.info({"version": VERSION, "python": platform.python_version(), "django": django.get_version()})
STREAM_CATCH_UPS = Counter(
    "gateway_stream_catch_ups", "Times a stream fell behind its in-memory window and caught up from the store"
)
LIVE_SOURCES = Gauge("gateway_live_sources", "Sources (users, process instances, broadcasts) this web process hears")
LIVE_EVENTS = Counter("gateway_live_events", "Events this web process heard on its live feed (its streams' sources)")


def count_database_queries() -> None:
    """Count every statement this process sends (DATABASE_QUERIES), on each connection as it opens."""
    connection_created.connect(_count_on, dispatch_uid="gateway-count-database-queries")


def _count_on(sender: object, connection: Any, **kwargs: object) -> None:
    connection.execute_wrappers.append(_counted)


def _counted(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
    DATABASE_QUERIES.inc()
    return execute(sql, params, many, context)
