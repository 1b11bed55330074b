"""Reads: grants on the stream's way in, and what the admin asks of tables with millions of rows.

The admin helpers never scan a whole audit table: counts stop at a cap, the values a filter offers and the
periods a date hierarchy offers are found by index seeks (one per value), and searches are exact matches
on indexed columns.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, models
from django.db.models import Count, Min, Q
from django.utils import timezone

from events.core import blocking
from events.core.store import parse_id
from subscriptions.models import BroadcastDelivery, DeliveryAudit, Grant, RejectedRecord, Subscription

EVENT_ID = re.compile(r"^[0-9]{1,15}-[0-9]{1,15}\Z")
KAFKA_COORDINATES = re.compile(r"^(?P<topic>.+)/(?P<partition>[0-9]{1,9})/(?P<offset>[0-9]{1,18})\Z")
# A date hierarchy lists at most this many periods (a day level has at most 31; years, a handful).
MAX_PERIODS = 400


def grants_missing(*, user: str, process_instances: Sequence[str]) -> list[str]:
    """The requested process instances `user` holds no active grant for, in request order."""
    if not process_instances:
        return []
    granted = set(
        Grant.objects.filter(user=user, process_instance__in=process_instances, revoked_at__isnull=True).values_list(
            "process_instance", flat=True
        )
    )
    return [p for p in process_instances if p not in granted]


def grant_active_exists(*, user: str, process_instance: str) -> bool:
    return Grant.objects.filter(user=user, process_instance=process_instance, revoked_at__isnull=True).exists()


# --- counting and listing without full scans -------------------------------------------------------------
def count_capped(*, queryset: models.QuerySet[Any], cap: int) -> int:
    """min(rows of `queryset`, cap + 1): reads at most cap + 1 index entries."""
    return queryset.order_by().values("pk")[: cap + 1].count()


def count_estimated(*, queryset: models.QuerySet[Any]) -> int | None:
    """The planner's row estimate of an unfiltered table on PostgreSQL (kept by ANALYZE/autovacuum);
    None when the queryset is filtered, the database is not PostgreSQL, or the table was never analysed."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql" or queryset.query.where:
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            [connection.ops.quote_name(queryset.model._meta.db_table)],
        )
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None


def distinct_values(*, model: type[models.Model], field: str, limit: int = 100) -> list[str]:
    """The distinct non-empty values of an indexed column, in order, by one index seek per value
    (a recursive "loose index scan"; SELECT DISTINCT would read every row)."""
    connection = connections[model._default_manager.db]
    qn = connection.ops.quote_name
    db_field = model._meta.get_field(field)
    assert isinstance(db_field, models.Field)
    column, table = qn(db_field.column), qn(model._meta.db_table)
    sql = (
        f"WITH RECURSIVE v(x) AS (SELECT MIN({column}) FROM {table} WHERE {column} > %s"  # noqa: S608
        f" UNION ALL SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > v.x) FROM v WHERE v.x IS NOT NULL)"
        " SELECT x FROM v WHERE x IS NOT NULL LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, ["", limit])
        return [row[0] for row in cursor.fetchall()]


def edge_value(*, queryset: models.QuerySet[Any], field: str, last: bool = False) -> Any:
    """MIN (or, with last, MAX) of an indexed column, as ORDER BY … LIMIT 1: one index seek on every engine
    (SQLite reads the whole index for MIN and MAX in one query, or for MIN under a second range condition)."""
    ordered = queryset.filter(**{f"{field}__isnull": False}).order_by(f"-{field}" if last else field)
    return ordered.values_list(field, flat=True).first()


def periods_with_rows(*, queryset: models.QuerySet[Any], field: str, kind: str) -> list[datetime]:
    """The years, months or days (current time zone) in which `queryset` has rows, like
    QuerySet.datetimes(field, kind), but by one indexed MIN() per period found instead of a full scan."""
    tz = timezone.get_current_timezone()
    base = queryset.order_by()
    found: list[datetime] = []
    lower: datetime | None = None
    while len(found) < MAX_PERIODS:
        # The new lower bound goes first: given two on one column, SQLite seeks to the first one written.
        rows = base if lower is None else queryset.model._default_manager.filter(**{f"{field}__gte": lower}) & base
        first = edge_value(queryset=rows, field=field)
        if first is None:
            break
        start = _period_start(timezone.localtime(first, tz), kind)
        found.append(start)
        lower = _next_period(start, kind)
    return found


def _period_start(moment: datetime, kind: str) -> datetime:
    if kind == "year":
        return moment.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    if kind == "month":
        return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _next_period(start: datetime, kind: str) -> datetime:
    if kind == "year":
        return start.replace(year=start.year + 1)
    if kind == "month":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    naive = start.replace(tzinfo=None) + timedelta(days=1)
    return naive.replace(tzinfo=start.tzinfo)


# --- admin searches: exact matches on indexed columns ----------------------------------------------------
def _as_uuid(term: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(term)
    except ValueError:
        return None


def deliveries_matching(*, queryset: models.QuerySet[DeliveryAudit], term: str) -> models.QuerySet[DeliveryAudit]:
    """Deliveries of event `term`, or of process instance `term`, or on stream `term`, or to user `term`
    (the deliveries on that user's streams, whoever the event was addressed to)."""
    if EVENT_ID.match(term):
        return queryset.filter(event_id=term)
    parts: list[Q] = []
    stream_id = _as_uuid(term)
    if stream_id is not None:
        parts.append(Q(subscription_id=stream_id))
    if DeliveryAudit.objects.filter(process_instance=term).exists():
        parts.append(Q(process_instance=term))
    if Subscription.objects.filter(user=term).exists():
        # A subquery, not a join: each of the user's streams is a range of audit_sub_sent.
        parts.append(Q(subscription__in=Subscription.objects.filter(user=term).values("pk")))
    if not parts:
        return queryset.none()
    query = parts[0]
    for part in parts[1:]:
        query |= part
    return queryset.filter(query)


def subscriptions_matching(*, queryset: models.QuerySet[Subscription], term: str) -> models.QuerySet[Subscription]:
    """Stream `term`, or the streams of user `term`, or those served by instance `term`."""
    query = Q(user=term) | Q(instance=term)
    stream_id = _as_uuid(term)
    if stream_id is not None:
        query |= Q(pk=stream_id)
    return queryset.filter(query)


def grants_matching(*, queryset: models.QuerySet[Grant], term: str) -> models.QuerySet[Grant]:
    """Grants of user `term` or for process instance `term`."""
    return queryset.filter(Q(user=term) | Q(process_instance=term))


def rejected_records_matching(
    *, queryset: models.QuerySet[RejectedRecord], term: str
) -> models.QuerySet[RejectedRecord]:
    """The record at `topic/partition/offset`, or the records of topic `term`, or rejected for reason `term`."""
    coordinates = KAFKA_COORDINATES.match(term)
    if coordinates:
        return queryset.filter(
            topic=coordinates["topic"], partition=int(coordinates["partition"]), offset=int(coordinates["offset"])
        )
    return queryset.filter(Q(topic=term) | Q(reason=term))


# --- the accepted record behind a delivery -------------------------------------------------------------
def stored_event_get(*, event_id: str) -> dict[str, str] | None:
    """The event as stored in Redis (`events-gateway:events`), or None once retention dropped it.

    Raises redis.RedisError when Redis cannot be reached.
    """
    return blocking.stored_event_get(event_id=event_id)


def broadcasts_matching(
    *, queryset: models.QuerySet[BroadcastDelivery], term: str
) -> models.QuerySet[BroadcastDelivery]:
    if parse_id(term) is not None:
        return queryset.filter(event_id=term)
    return queryset.filter(instance=term)


def broadcast_recipients(*, event_id: str) -> models.QuerySet[Subscription]:
    """The streams that received broadcast `event_id` live: those registered on a web process that handed
    it out, from before it did until after (a stream's row is opened when it registers), less any that
    dropped it."""
    on_instance = models.Q(pk__in=[])
    for instance, at in BroadcastDelivery.objects.filter(event_id=event_id).values_list("instance", "sent_at"):
        on_instance |= models.Q(instance=instance, opened_at__lte=at) & (
            models.Q(closed_at__isnull=True) | models.Q(closed_at__gte=at)
        )
    dropped = DeliveryAudit.objects.filter(event_id=event_id, status=DeliveryAudit.Status.DROPPED)
    return Subscription.objects.filter(on_instance).exclude(pk__in=dropped.values("subscription_id"))


def rejected_records_by_reason(*, since: datetime) -> list[tuple[str, int]]:
    """Rejected records received since `since`, counted per reason, the most frequent first."""
    rows = (
        RejectedRecord.objects.filter(received_at__gte=since)
        .values("reason")
        .annotate(records=Count("pk"))
        .order_by("-records", "reason")
    )
    return [(row["reason"], row["records"]) for row in rows]


def open_streams_by_instance() -> list[tuple[str, int, datetime]]:
    """Streams not closed, per serving web process: (instance, streams, oldest opened_at), the most first.
    A web process that died without closing its streams keeps them here until they are closed."""
    rows = (
        Subscription.objects.filter(closed_at__isnull=True)
        .values("instance")
        .annotate(streams=Count("pk"), oldest=Min("opened_at"))
        .order_by("-streams", "instance")
    )
    return [(row["instance"], row["streams"], row["oldest"]) for row in rows]
