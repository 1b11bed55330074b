"""The dead-letter path: a record that is not a valid envelope goes to KAFKA_DLQ_TOPIC with the reason in
`x-gateway-error` and its coordinates in `x-gateway-source`, and is kept for the admin (RejectedRecord)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from events.core import envelope
from events.ops import metrics
from subscriptions import services
from subscriptions.models import RejectedRecord

logger = logging.getLogger(__name__)

Rejected = list[tuple[ConsumerRecord[bytes, bytes], envelope.InvalidRecord]]


async def send(producer: AIOKafkaProducer, rejected: Rejected) -> None:
    """Dead-letter `rejected` and record them; raises KafkaError or DatabaseError (the caller retries)."""
    for message, error in rejected:
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
            *message.headers,
            ("x-gateway-error", str(error).encode()),
            ("x-gateway-source", f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        try:
            await producer.send_and_wait(
                settings.KAFKA_DLQ_TOPIC, value=message.value, key=message.key, headers=headers
            )
        except MessageSizeTooLargeError:
            # The DLQ topic takes smaller records than the source: keep the coordinates, drop the value.
            await producer.send_and_wait(
                settings.KAFKA_DLQ_TOPIC,
                value=None,
                key=message.key,
                headers=[*headers, ("x-gateway-value-dropped", b"too large for the dead-letter topic")],
            )
        metrics.EVENTS_REJECTED.labels(message.topic, error.reason.value).inc()
    await sync_to_async(_record_rejections)(rejected)


def _record_rejections(rejected: Rejected) -> None:
    close_old_connections()
    now = datetime.now(UTC)
    services.rejected_records_create(
        records=[
            RejectedRecord(
                received_at=now,
                topic=m.topic,
                partition=m.partition,
                offset=m.offset,
                reason=e.reason.value,
                detail=e.detail,
                key=_printable(m.key or b"")[:1000],
                value_preview=_printable((m.value or b"")[:4096]),
                value_size=len(m.value or b""),
                headers=[[k, _printable(v)] for k, v in m.headers],
            )
            for m, e in rejected
        ]
    )


def _printable(raw: bytes) -> str:
    """Bytes as text a database column takes (PostgreSQL refuses NUL)."""
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")
