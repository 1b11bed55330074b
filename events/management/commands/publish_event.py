"""`manage.py publish_event`: produce one envelope to Kafka, as a backend service would."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from events.ingest.publish import envelope_build, event_publish


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
        envelope = envelope_build(
            type=options["type"],
            user=options["user"],
            process_instance=options["process_instance"],
            broadcast=options["broadcast"],
            event=options["event"],
            data=data,
            producer_id=options["producer_id"],
        )
        published = asyncio.run(event_publish(envelope=envelope, topic=options["topic"]))
        self.stdout.write(
            f"published to {published.topic}/{published.partition} at offset {published.offset}: {json.dumps(envelope)}"
        )
