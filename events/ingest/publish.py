"""Produce one envelope to Kafka, as a backend service would (the publish_event command, the demo page)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from django.conf import settings

from events.core import envelope as envelopes
from events.ingest.kafka import kafka_options


@dataclass(frozen=True, slots=True)
class Published:
    topic: str
    partition: int
    offset: int


def envelope_build(
    *,
    type: str = "message",
    user: str | None = None,
    process_instance: str | None = None,
    broadcast: bool = False,
    event: str | None = None,
    data: Any = None,
    producer_id: str | None = None,
) -> dict[str, Any]:
    """The CONTRACT section 3 envelope for these fields; only the fields given are set."""
    built: dict[str, Any] = {"type": type}
    if type == "message":
        built["data"] = data
        if event:
            built["event"] = event
    for key, value in (("user", user), ("processInstanceUuid", process_instance), ("id", producer_id)):
        if value:
            built[key] = value
    if broadcast:
        built["broadcast"] = True
    return built


def envelope_check(envelope: dict[str, Any]) -> bytes:
    """The record value for `envelope`; raises envelope.InvalidRecord if the consumer would reject it."""
    value = json.dumps(envelope).encode()
    envelopes.parse(value, max_bytes=settings.KAFKA_MESSAGE_MAX_BYTES)
    return value


async def event_publish(*, envelope: dict[str, Any], topic: str | None = None) -> Published:
    """Produce `envelope` as is to `topic` (default: the first of KAFKA_TOPICS), keyed by process instance
    or user. Not validated here (envelope_check does that): a test may mean to send a bad record.
    Raises aiokafka's KafkaError when the broker cannot be reached.
    """
    value = json.dumps(envelope).encode()
    topic = topic or settings.KAFKA_TOPICS[0]
    key = envelope.get("processInstanceUuid") or envelope.get("user")
    producer = AIOKafkaProducer(**kafka_options())
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, value=value, key=key.encode() if key else None)
    finally:
        await producer.stop()
    return Published(topic, meta.partition, meta.offset)
