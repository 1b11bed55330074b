"""`manage.py replay_dead_letters`: dead letters back to their source topic, once each (events/tools/replay.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import KafkaError
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from events.core.envelope import Rejection
from events.tools.replay import ReplayFailed, dead_letters_replay
from events.tools.tail import BadPosition, position_parse


class Command(BaseCommand):
    help = (
        "Send the records in KAFKA_DLQ_TOPIC back to the topic they came from (x-gateway-source), once each: "
        "a marker in Redis remembers what was replayed, so a second run sends nothing twice."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", default="", help="dead-lettered at or after: epoch ms or ISO 8601 time")
        parser.add_argument(
            "--reason",
            action="append",
            default=[],
            choices=[r.value for r in Rejection],
            help="only records rejected for this reason (repeatable)",
        )
        parser.add_argument("--dry-run", action="store_true", help="list what would be replayed; send nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        since_ms = None
        if options["since"]:
            try:
                position = position_parse(options["since"])
            except BadPosition as exc:
                raise CommandError(f"--since {exc}") from None
            if position is None or "-" not in position:
                raise CommandError("--since takes a time (epoch ms or ISO 8601), not an event id")
            since_ms = int(position.split("-")[0]) + 1 if position != "0-0" else 0

        def write(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        try:
            result = asyncio.run(
                dead_letters_replay(
                    dlq_topic=settings.KAFKA_DLQ_TOPIC,
                    redis_url=settings.REDIS_URL,
                    since_ms=since_ms,
                    reasons=frozenset(options["reason"]),
                    dry_run=options["dry_run"],
                    write=write,
                )
            )
        except (ReplayFailed, KafkaError) as exc:
            raise CommandError(str(exc)) from exc
        if options["dry_run"]:
            self.stdout.write(f"dry run: {result.outcomes['would replay']} would be replayed; nothing sent")
