"""`manage.py publish_event`: produce one envelope to Kafka, as a backend service would."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaProducer
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from events.ingest import kafka_options


class Command(BaseCommand):
    help = "Publish a test event to the first of KAFKA_TOPICS (or --topic)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--type", choices=["message", "connect", "disconnect"], default="message")
        parser.add_argument("--user")
        parser.add_argument("--process-instance", dest="process_instance")
        parser.add_argument("--broadcast", action="store_true")
        parser.add_argument("--event", default=None, help="SSE event name (default: message)")
        parser.add_argument("--data", default="{}", help="JSON payload")
        parser.add_argument("--id", dest="producer_id", help="producer id for de-duplication")
        parser.add_argument("--topic", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            data = json.loads(options["data"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--data is not JSON: {exc}") from exc
        envelope: dict[str, Any] = {"type": options["type"]}
        if options["type"] == "message":
            envelope["data"] = data
            if options["event"]:
                envelope["event"] = options["event"]
        for key, option in (("user", "user"), ("processInstanceUuid", "process_instance"), ("id", "producer_id")):
            if options[option]:
                envelope[key] = options[option]
        if options["broadcast"]:
            envelope["broadcast"] = True
        topic = options["topic"] or settings.KAFKA_TOPICS[0]
        key = options["process_instance"] or options["user"]
        partition, offset = asyncio.run(_publish(topic, key, json.dumps(envelope).encode()))
        self.stdout.write(f"published to {topic}/{partition} at offset {offset}: {json.dumps(envelope)}")


async def _publish(topic: str, key: str | None, value: bytes) -> tuple[int, int]:
    producer = AIOKafkaProducer(**kafka_options())
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, value=value, key=key.encode() if key else None)
        return meta.partition, meta.offset
    finally:
        await producer.stop()
