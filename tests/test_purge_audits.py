"""`manage.py purge_audits --older-than …`: old audit rows go, recent ones and grants stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from subscriptions.models import BroadcastDelivery, DeliveryAudit, Grant, RejectedRecord, Subscription

pytestmark = pytest.mark.django_db

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=2)


def stream(user: str, opened: datetime, closed: datetime | None) -> Subscription:
    return Subscription.objects.create(
        user=user, auth_method="bearer", opened_at=opened, closed_at=closed, instance="web-1:1"
    )


def deliveries(sub: Subscription, count: int, at: datetime) -> list[int]:
    rows = DeliveryAudit.objects.bulk_create(
        DeliveryAudit(subscription=sub, event_id=f"{i}-0", event="Data", status="delivered", sent_at=at)
        for i in range(count)
    )
    return [row.pk for row in rows]


def rejected(at: datetime, offset: int) -> RejectedRecord:
    return RejectedRecord.objects.create(
        received_at=at, topic="t", partition=0, offset=offset, reason="not_json", detail="", value_size=1
    )


def broadcast(event_id: str, at: datetime) -> BroadcastDelivery:
    return BroadcastDelivery.objects.create(event_id=event_id, event="All", instance="web-1:1", streams=3, sent_at=at)


@pytest.fixture
def history() -> dict[str, Any]:
    old_closed = stream("alice", OLD, OLD + timedelta(hours=1))  # all its audits are old: goes
    spanning = stream("bob", OLD, RECENT)  # old and recent audits: only the old ones go
    still_open = stream("carol", OLD, None)  # open since long ago: stays, its old audits go
    recent = stream("dave", RECENT, None)
    grant = Grant.objects.create(
        user="alice", process_instance="p", granted_at=OLD, granted_by="kafka t/0/1", source="kafka"
    )
    return {
        "old_closed": old_closed,
        "spanning": spanning,
        "still_open": still_open,
        "recent": recent,
        "old_audits": deliveries(old_closed, 5, OLD) + deliveries(spanning, 4, OLD) + deliveries(still_open, 3, OLD),
        "recent_audits": deliveries(spanning, 2, RECENT) + deliveries(recent, 3, RECENT),
        "old_rejected": [rejected(OLD, 1), rejected(OLD, 2)],
        "recent_rejected": [rejected(RECENT, 3)],
        "old_broadcasts": [broadcast("1-0", OLD), broadcast("2-0", OLD)],
        "recent_broadcasts": [broadcast("3-0", RECENT)],
        "grant": grant,
    }


def purge(*args: str) -> str:
    out = StringIO()
    call_command("purge_audits", *args, stdout=out)
    return out.getvalue()


def test_old_rows_go_in_chunks_and_recent_rows_stay(history: dict[str, Any]) -> None:
    output = purge("--older-than", "30d", "--chunk-size", "5")

    assert set(DeliveryAudit.objects.values_list("pk", flat=True)) == set(history["recent_audits"])
    streams = set(Subscription.objects.values_list("user", flat=True))
    assert streams == {"bob", "carol", "dave"}
    assert list(RejectedRecord.objects.values_list("offset", flat=True)) == [3]
    assert list(BroadcastDelivery.objects.values_list("event_id", flat=True)) == ["3-0"]
    assert Grant.objects.count() == 1
    # 12 old audits in chunks of 5, two broadcast rows, one stream, two rejected records.
    assert "deleted 12 delivery audits, 2 broadcast rows, 1 closed streams, 2 rejected records" in output
    assert "in 6 chunks of at most 5 rows" in output


def test_dry_run_counts_and_deletes_nothing(history: dict[str, Any]) -> None:
    output = purge("--older-than", "30d", "--dry-run")

    assert "would delete 12 delivery audits, 2 broadcast rows, 1 closed streams, 2 rejected records" in output
    assert BroadcastDelivery.objects.count() == 3
    assert DeliveryAudit.objects.count() == 17
    assert Subscription.objects.count() == 4
    assert RejectedRecord.objects.count() == 3


def test_ages_in_hours_minutes_and_seconds(history: dict[str, Any]) -> None:
    purge("--older-than", "72h")
    assert DeliveryAudit.objects.count() == 5
    purge("--older-than", "60s")
    assert DeliveryAudit.objects.count() == 0
    assert Subscription.objects.filter(closed_at__isnull=True).count() == 2  # open streams are never purged


@pytest.mark.parametrize("age", ["30", "30x", "d", "0d", "-1d"])
def test_bad_ages_are_refused(age: str) -> None:
    with pytest.raises(CommandError, match="older-than"):
        purge("--older-than", age)
