"""The audit wire format: what a web process's streams did, sent through Redis to the audit sink.

Defined once, here: the web side (events.delivery.audit_writer) builds these rows, the sink
(events.ingest.audit_sink) unpacks them, and subscriptions.services writes them, taking each row's field
names as the model's field names. Times are epoch seconds; ids are text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack


class StreamRow(NamedTuple):
    """One stream (a Subscription row): sent when it opens, and again with its end when it closes."""

    id: str
    user: str
    process_instances: list[str]
    auth_method: str
    opened_at: float
    resumed_from: str
    client_address: str
    user_agent: str
    instance: str
    closed_at: float | None
    close_reason: str
    last_event_id: str
    events_delivered: int


class DeliveryRow(NamedTuple):
    """One event on one stream (a DeliveryAudit row)."""

    subscription: str
    event_id: str
    event: str
    status: str
    user: str
    process_instance: str
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    sent_at: float
    latency_ms: float | None


class BroadcastRow(NamedTuple):
    """One live broadcast handed to every open stream of one web process (a BroadcastDelivery row)."""

    event_id: str
    event: str
    instance: str
    streams: int
    sent_at: float
    latency_ms: float | None
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int


def audit_text(value: str, limit: int) -> str:
    """A value a client sent, fit for a text column: printable characters only (PostgreSQL refuses NUL),
    at most `limit` of them."""
    return "".join(c for c in value[: limit * 2] if c.isprintable())[:limit]


@dataclass(slots=True)
class AuditBatch:
    """What one web process sends in one flush: one Redis stream entry."""

    opened: list[StreamRow] = field(default_factory=list)
    deliveries: list[DeliveryRow] = field(default_factory=list)
    broadcasts: list[BroadcastRow] = field(default_factory=list)
    closed: list[StreamRow] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.opened or self.deliveries or self.broadcasts or self.closed)

    def pack(self) -> bytes:
        return msgpack.packb(
            {"opened": self.opened, "deliveries": self.deliveries, "broadcasts": self.broadcasts, "closed": self.closed}
        )

    @classmethod
    def unpack(cls, raw: bytes) -> AuditBatch:
        """Raises ValueError or TypeError when `raw` is not a batch of this shape."""
        batch: Any = msgpack.unpackb(raw)
        return cls(
            opened=[StreamRow._make(row) for row in batch["opened"]],
            deliveries=[DeliveryRow._make(row) for row in batch["deliveries"]],
            broadcasts=[BroadcastRow._make(row) for row in batch["broadcasts"]],
            closed=[StreamRow._make(row) for row in batch["closed"]],
        )

    def prepend(self, earlier: AuditBatch) -> None:
        """Put `earlier`'s rows (a flush that failed) before this batch's."""
        self.opened[:0] = earlier.opened
        self.deliveries[:0] = earlier.deliveries
        self.broadcasts[:0] = earlier.broadcasts
        self.closed[:0] = earlier.closed
