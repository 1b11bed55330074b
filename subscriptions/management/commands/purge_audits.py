"""`manage.py purge_audits --older-than 30d`: audit retention, in short chunks (CONTRACT section 1)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from subscriptions import services

AGE = re.compile(r"^(\d+)([dhms])\Z")
UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_age(value: str) -> timedelta:
    """`30d`, `12h`, `15m` or `45s` as a timedelta."""
    match = AGE.match(value.strip())
    if not match or int(match[1]) == 0:
        raise CommandError(f"--older-than {value!r}: use a positive number of d, h, m or s, like 30d")
    return timedelta(seconds=int(match[1]) * UNIT_SECONDS[match[2]])


class Command(BaseCommand):
    help = (
        "Delete delivery audits and rejected records older than --older-than, and closed streams with no "
        "audits left, a chunk of rows per short transaction. Grants are kept."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", required=True, help="age like 30d, 12h, 15m or 45s")
        parser.add_argument("--chunk-size", type=int, default=5000, help="rows deleted per transaction")
        parser.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
        parser.add_argument(
            "--pause",
            type=float,
            default=0.0,
            help="seconds to wait between chunks, so a busy database keeps up (default 0)",
        )
        parser.add_argument("--quiet", action="store_true", help="print only the summary, not each chunk")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["chunk_size"] < 1:
            raise CommandError("--chunk-size must be positive")
        if not 0 <= options["pause"] <= 3600:
            raise CommandError("--pause takes seconds between 0 and 3600")
        before = timezone.now() - parse_age(options["older_than"])

        def progress(table: str, deleted: int) -> None:
            self.stdout.write(f"  {table}: {deleted:,} deleted so far")
            self.stdout.flush()

        result = services.audits_purge(
            before=before,
            chunk_size=options["chunk_size"],
            dry_run=options["dry_run"],
            pause_seconds=options["pause"],
            progress=None if options["quiet"] else progress,
        )
        what = (
            f"{result.audits:,} delivery audits, {result.broadcasts:,} broadcast rows, "
            f"{result.subscriptions:,} closed streams, "
            f"{result.rejected_records:,} rejected records older than {before.isoformat(timespec='seconds')}"
        )
        if options["dry_run"]:
            self.stdout.write(f"would delete {what} (dry run: nothing deleted)")
        else:
            self.stdout.write(
                f"deleted {what} in {result.chunks:,} chunks of at most {options['chunk_size']:,} rows "
                f"(longest transaction {result.longest_chunk_seconds * 1000:.0f} ms)"
            )
