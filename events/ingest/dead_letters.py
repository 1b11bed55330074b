"""The dead-letter path: a record that is not a valid envelope goes to KAFKA_DLQ_TOPIC with the reason in
`x-gateway-error` and its coordinates in `x-gateway-source`, and is kept for the admin (RejectedRecord)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TypeAlias

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError
from django.conf import settings
from django.db import close_old_connections

from events.core import envelope
from events.ops import metrics
from subscriptions import services
from subscriptions.models import RejectedRecord

logger = logging.getLogger(__name__)

Message: TypeAlias = ConsumerRecord[bytes, bytes]
Rejected = list[tuple[Message, envelope.InvalidRecord]]


async def publish(producer: AIOKafkaProducer, message: Message, error: envelope.InvalidRecord) -> None:
    """Copy one rejected record to the dead-letter topic; raises KafkaError when the broker fails."""
    logger.warning(
        "record rejected",
        extra={
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "reason": error.reason.value,
            "detail": error.detail,
        },
    )
    headers = [
        *((key, value) for key, value in message.headers),
        ("x-gateway-error", str(error).encode("utf-8", "replace")),
        ("x-gateway-source", f"{message.topic}/{message.partition}/{message.offset}".encode("utf-8", "replace")),
    ]
    try:
        await producer.send_and_wait(settings.KAFKA_DLQ_TOPIC, value=message.value, key=message.key, headers=headers)
    except MessageSizeTooLargeError:
        # The DLQ topic takes smaller records than the source: keep the coordinates, drop the value (and
        # the key and the producer's headers, if the record is still too large with them).
        dropped = [("x-gateway-value-dropped", b"too large for the dead-letter topic")]
        try:
            await producer.send_and_wait(
                settings.KAFKA_DLQ_TOPIC, value=None, key=message.key, headers=[*headers, *dropped]
            )
        except MessageSizeTooLargeError:
            await producer.send_and_wait(
                settings.KAFKA_DLQ_TOPIC, value=None, key=None, headers=[*headers[-2:], *dropped]
            )
    metrics.EVENTS_REJECTED.labels(message.topic, error.reason.value).inc()


def record(rejected: Rejected) -> None:
    """Keep the rejected records for the admin (sync: call through sync_to_async)."""
    close_old_connections()
    now = datetime.now(UTC)
    services.rejected_records_create(
        records=[
            RejectedRecord(
                received_at=now,
                topic=_printable(m.topic.encode("utf-8", "replace")),
                partition=m.partition,
                offset=m.offset,
                reason=e.reason.value,
                detail=_printable(e.detail.encode("utf-8", "replace")),
                key=_printable(m.key or b"")[:1000],
                value_preview=_printable((m.value or b"")[:4096]),
                value_size=len(m.value or b""),
                headers=[[_printable(str(k).encode("utf-8", "replace")), _header_text(v)] for k, v in m.headers],
            )
            for m, e in rejected
        ]
    )


def _header_text(value: bytes | None) -> str | None:
    """A header value as text (None: the producer sent a null value)."""
    return None if value is None else _printable(value[:1000])


def _printable(raw: bytes) -> str:
    """Bytes as text a database column takes (PostgreSQL refuses NUL, also inside JSON)."""
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")
