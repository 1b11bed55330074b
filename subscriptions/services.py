"""Writes: grants, rejected records, streams and their delivery audits. Sync; call via sync_to_async."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from django.db import IntegrityError, transaction

from subscriptions.models import DeliveryAudit, Grant, RejectedRecord, Subscription


def grant_apply(*, user: str, process_instance: str, granted_by: str, source: str, at: datetime) -> bool:
    """Let `user` follow `process_instance`; False if an active grant already existed."""
    try:
        with transaction.atomic():
            Grant.objects.create(
                user=user, process_instance=process_instance, granted_by=granted_by[:255], source=source, granted_at=at
            )
    except IntegrityError:
        return False
    return True


def grant_revoke(*, user: str, process_instance: str, revoked_by: str, at: datetime) -> int:
    """End the active grant, if any; returns how many were ended."""
    return Grant.objects.filter(user=user, process_instance=process_instance, revoked_at__isnull=True).update(
        revoked_at=at, revoked_by=revoked_by[:255]
    )


def rejected_records_create(*, records: Sequence[RejectedRecord]) -> None:
    RejectedRecord.objects.bulk_create(records)


def subscriptions_close_orphaned(*, instance: str, closed_at: datetime) -> int:
    """Close rows a previous run of this process left open (it died without closing them)."""
    return Subscription.objects.filter(instance=instance, closed_at__isnull=True).update(
        closed_at=closed_at, close_reason=Subscription.CloseReason.SHUTDOWN
    )


def streams_record(
    *, opened: Sequence[Subscription], audits: Iterable[DeliveryAudit], closed: Sequence[Subscription]
) -> None:
    """Write what streams did since the last flush: new streams, their deliveries, then closings."""
    with transaction.atomic():
        Subscription.objects.bulk_create(opened, batch_size=1000)
        DeliveryAudit.objects.bulk_create(list(audits), batch_size=2000)
        for sub in closed:
            Subscription.objects.filter(pk=sub.pk).update(
                closed_at=sub.closed_at,
                close_reason=sub.close_reason,
                last_event_id=sub.last_event_id,
                events_delivered=sub.events_delivered,
            )
