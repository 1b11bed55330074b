"""`manage.py tail_events`: print stored events as they arrive (events/tools/tail.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from events.tools.tail import BadPosition, TailFilter, events_tail, position_parse


class Command(BaseCommand):
    help = (
        "Print events as the store holds them, as they arrive: id, publish time, name, addressees, Kafka record "
        "and data. Filters combine with OR; without any, every event (grants included) is shown. Ctrl-C stops."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", action="append", default=[], help="events addressed to this user (repeatable)")
        parser.add_argument(
            "--process-instance", action="append", default=[], help="events of this process instance (repeatable)"
        )
        parser.add_argument("--broadcast", action="store_true", help="broadcasts")
        parser.add_argument(
            "--from",
            dest="start",
            default="now",
            help="an event id, 0 (all still held), epoch ms or an ISO 8601 time; default: from now on",
        )
        parser.add_argument("--limit", type=int, default=None, help="stop after printing this many events")
        parser.add_argument("--json", action="store_true", help="one JSON object per line")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            start = position_parse(options["start"])
        except BadPosition as exc:
            raise CommandError(f"--from {exc}") from None
        only = TailFilter(
            users=frozenset(options["user"]),
            process_instances=frozenset(options["process_instance"]),
            broadcast=options["broadcast"],
        )

        def write(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        async def tail() -> None:
            # Ctrl-C asks the tail to stop (it finishes its read and closes its connection); a second one
            # cancels it outright (a Redis that does not answer).
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            this = asyncio.current_task()
            assert this is not None

            def interrupted() -> None:
                if stop.is_set():
                    this.cancel()
                stop.set()

            loop.add_signal_handler(signal.SIGINT, interrupted)
            try:
                await events_tail(
                    redis_url=settings.REDIS_URL,
                    retention_seconds=settings.EVENTS_RETENTION_SECONDS,
                    start=start,
                    only=only,
                    write=write,
                    limit=options["limit"],
                    as_json=options["json"],
                    stop=stop,
                )
            finally:
                loop.remove_signal_handler(signal.SIGINT)

        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            asyncio.run(tail())
