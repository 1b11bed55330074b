"""`manage.py generate_audits --rows 2000000`: realistic streams, deliveries, grants and rejected records, fast.

For timing the admin (bench/admin_timings.py) and trying it out; never for production. Rows are added to
what is there. Deliveries are written with raw multi-row statements (COPY on PostgreSQL), not the ORM.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

from events.core.audit import DeliveryRow, StreamRow
from subscriptions import services
from subscriptions.models import DeliveryAudit, Grant, RejectedRecord, Subscription

TOPIC = "messaging_events_topic"
PARTITIONS = 6
USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
)
CLOSE_REASONS = ("client_gone",) * 90 + ("auth_expired",) * 5 + ("shutdown",) * 3 + ("slow_client",) * 2
AUTH_METHODS = ("session",) * 5 + ("bearer",) * 3 + ("ticket",) * 2
USER_EVENTS = ("Notification", "Data", "TaskAssigned")
PROCESS_EVENTS = ("ProcessMetadata", "TaskUpdate", "ProgressUpdate")


@dataclass(frozen=True, slots=True)
class Generated:
    streams: int
    open_streams: int
    deliveries: int
    grants: int
    rejected: int
    seconds: float


class Command(BaseCommand):
    help = "Add realistic streams, delivery audits, grants and rejected records (for timing the admin)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--rows", type=int, default=2_000_000, help="delivery audits to add")
        parser.add_argument("--days", type=int, default=30, help="spread over this many days up to now")
        parser.add_argument("--per-stream", type=int, default=50, help="mean deliveries per stream")
        parser.add_argument("--open-streams", type=int, default=300, help="streams still open")
        parser.add_argument("--rejected", type=int, default=None, help="rejected records (default rows/100)")
        parser.add_argument("--seed", type=int, default=1)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["rows"] < 1 or options["days"] < 1 or options["per_stream"] < 1:
            raise CommandError("--rows, --days and --per-stream must be positive")
        result = generate(
            rows=options["rows"],
            days=options["days"],
            per_stream=options["per_stream"],
            open_streams=options["open_streams"],
            rejected=options["rows"] // 100 if options["rejected"] is None else options["rejected"],
            seed=options["seed"],
            progress=self.stdout.write,
        )
        self.stdout.write(
            f"added {result.deliveries:,} delivery audits on {result.streams:,} streams "
            f"({result.open_streams:,} open), {result.grants:,} grants, {result.rejected:,} rejected records "
            f"in {result.seconds:.1f} s"
        )


def generate(
    *,
    rows: int,
    days: int,
    per_stream: int,
    open_streams: int,
    rejected: int,
    seed: int,
    progress: Callable[[str], Any] | None = None,
) -> Generated:
    started = time.monotonic()
    rng = random.Random(seed)  # noqa: S311 (test data, reproducible by seed)
    now = timezone.now()
    span_s = days * 86_400.0
    start = now - timedelta(seconds=span_s)
    users = [f"user{i:05d}" for i in range(max(10, rows // 1000))]
    # A few users open many more streams than most (a skewed, Zipf-like mix).
    user_weights = list(itertools.accumulate(1 / (i + 1) ** 0.7 for i in range(len(users))))
    process_instances = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(max(10, rows // 2000))]
    instances = [f"web-{i}.gateway.internal:{1000 + 17 * i}" for i in range(4)]

    streams_written = deliveries_written = opened_now = 0
    followed_pairs: dict[tuple[str, str], datetime] = {}
    sub_rows: list[StreamRow] = []
    audit_rows: list[DeliveryRow] = []
    next_report = 200_000
    while deliveries_written + len(audit_rows) < rows:
        stream_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        user = rng.choices(users, cum_weights=user_weights)[0]
        followed = rng.sample(process_instances, rng.choice((0, 1, 1, 1, 2, 3)))
        still_open = opened_now < open_streams and rng.random() < open_streams / max(1, rows / per_stream)
        if still_open:
            opened = now - timedelta(seconds=rng.uniform(60, 4 * 3600))
            closed: datetime | None = None
            opened_now += 1
        else:
            opened = start + timedelta(seconds=rng.uniform(0, span_s - 7200))
            closed = opened + timedelta(seconds=min(rng.expovariate(1 / 1800) + 5, 7200))
        for pi in followed:
            followed_pairs.setdefault((user, pi), opened)
        close_reason = "" if closed is None else rng.choice(CLOSE_REASONS)
        resumed = rng.random() < 0.3
        count = min(int(rng.expovariate(1 / per_stream)) + 1, rows - deliveries_written - len(audit_rows))
        end = closed or now
        length = (end - opened).total_seconds()
        times = sorted(rng.uniform(0, length) for _ in range(count))
        seen: set[str] = set()
        last_event_id = ""
        delivered = 0
        dropped_from = count - rng.randint(1, 30) if close_reason == "slow_client" else count
        replayed_until = rng.randint(1, 6) if resumed else 0
        stream_pk = str(stream_id)
        for i, offset_s in enumerate(times):
            sent = opened + timedelta(seconds=offset_s)
            ms = int(sent.timestamp() * 1000)
            kind = rng.random()
            if kind < 0.2:  # a broadcast: every stream open in that minute got the same event
                ms -= ms % 60_000
                event_id, event, ev_user, ev_pi = f"{ms}-0", "SystemNotice", "", ""
            elif kind < 0.7 and followed:
                ev_pi = rng.choice(followed)
                event_id, event = f"{ms}-{rng.randrange(1, 40)}", rng.choice(PROCESS_EVENTS)
                ev_user = user if kind < 0.3 else ""
            else:
                event_id, event, ev_user, ev_pi = f"{ms}-{rng.randrange(1, 40)}", rng.choice(USER_EVENTS), user, ""
            if event_id in seen:
                continue
            seen.add(event_id)
            if i >= dropped_from:
                status, latency = "dropped", None
            elif i < replayed_until:
                status, latency = "replayed", round(rng.uniform(2_000, 600_000), 1)
            else:
                status, latency = "delivered", round(rng.lognormvariate(2.3, 0.8), 2)
            if status != "dropped":
                delivered += 1
                last_event_id = event_id
            audit_rows.append(
                DeliveryRow(
                    stream_pk,
                    event_id,
                    event,
                    status,
                    ev_user,
                    ev_pi,
                    TOPIC,
                    ms % PARTITIONS,
                    ms // 7,
                    sent.timestamp(),
                    latency,
                )
            )
        sub_rows.append(
            StreamRow(
                stream_pk,
                user,
                sorted(followed),
                rng.choice(AUTH_METHODS),
                opened.timestamp(),
                f"{int(opened.timestamp() * 1000) - 5000}-0" if resumed else "",
                f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                rng.choice(USER_AGENTS),
                rng.choice(instances),
                closed.timestamp() if closed else None,
                close_reason,
                last_event_id,
                delivered,
            )
        )
        if len(audit_rows) >= 50_000:
            _write(sub_rows, audit_rows)
            streams_written += len(sub_rows)
            deliveries_written += len(audit_rows)
            sub_rows, audit_rows = [], []
            if progress and deliveries_written >= next_report:
                progress(f"  {deliveries_written:,} deliveries on {streams_written:,} streams")
                next_report += 200_000
    _write(sub_rows, audit_rows)
    streams_written += len(sub_rows)
    deliveries_written += len(audit_rows)

    grants = _grants(rng, followed_pairs)
    rejected_written = _rejected(rng, rejected, start, span_s)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return Generated(
        streams_written, opened_now, deliveries_written, grants, rejected_written, time.monotonic() - started
    )


def _columns(model: Any, *, skip_auto: bool) -> list[str]:
    return [f.column for f in model._meta.concrete_fields if not (skip_auto and f.primary_key and f.auto_created)]


def _write(sub_rows: list[StreamRow], audit_rows: list[DeliveryRow]) -> None:
    """Write rows in the audit wire format (events.core.audit), as the audit sink would, but by COPY."""
    sub_columns = _columns(Subscription, skip_auto=False)
    audit_columns = _columns(DeliveryAudit, skip_auto=True)
    sub_order = services.db_columns(Subscription, StreamRow._fields)
    audit_order = services.db_columns(DeliveryAudit, DeliveryRow._fields)
    if sorted(sub_columns) != sorted(sub_order) or sorted(audit_columns) != sorted(audit_order):
        raise CommandError("the models and the audit rows (events/core/audit.py) differ: update both")
    with transaction.atomic():
        _insert(
            Subscription._meta.db_table, sub_order, services.audit_params(Subscription, StreamRow._fields, sub_rows)
        )
        _insert(
            DeliveryAudit._meta.db_table,
            audit_order,
            services.audit_params(DeliveryAudit, DeliveryRow._fields, audit_rows),
        )


def _insert(table: str, columns: list[str], rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    qn = connection.ops.quote_name
    names = ", ".join(qn(c) for c in columns)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            raw: Any = cursor.cursor
            with raw.copy(f"COPY {qn(table)} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        placeholders = ", ".join(["%s"] * len(columns))
        cursor.executemany(f"INSERT INTO {qn(table)} ({names}) VALUES ({placeholders})", rows)  # noqa: S608


def _grants(rng: random.Random, pairs: dict[tuple[str, str], datetime]) -> int:
    grants = []
    for (user, pi), first_opened in pairs.items():
        granted_at = first_opened - timedelta(minutes=rng.uniform(1, 600))
        revoked = rng.random() < 0.1
        granted_by = f"kafka engine-connect/0/{rng.randrange(10**6)}"
        revoked_at = granted_at + timedelta(days=rng.uniform(1, 20)) if revoked else None
        grants.append(
            Grant(
                user=user,
                process_instance=pi,
                granted_at=granted_at,
                recorded_at=granted_at,
                granted_by=granted_by,
                source=Grant.Source.KAFKA,
                revoked_at=revoked_at,
                revoke_recorded_at=revoked_at,
                revoked_by=f"kafka engine-connect/0/{rng.randrange(10**6)}" if revoked else "",
            )
        )
    Grant.objects.bulk_create(grants, batch_size=2000, ignore_conflicts=True)
    return len(grants)


def _rejected(rng: random.Random, count: int, start: datetime, span_s: float) -> int:
    reasons = ("not_json", "no_target", "bad_event", "missing_data", "too_large", "bad_process_instance")
    records = []
    for i in range(count):
        reason = rng.choice(reasons)
        value = b'{"event": "Data", "data": ' if reason == "not_json" else b'{"event": "Data"}'
        records.append(
            RejectedRecord(
                received_at=start + timedelta(seconds=rng.uniform(0, span_s)),
                topic=rng.choice((TOPIC, TOPIC, "engine_connect_topic")),
                partition=rng.randrange(PARTITIONS),
                offset=1_000_000 + i,
                reason=reason,
                detail=f"{reason.replace('_', ' ')} (generated)",
                key=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                value_preview=value.decode(),
                value_size=len(value),
                headers=[],
            )
        )
    RejectedRecord.objects.bulk_create(records, batch_size=2000)
    return count
