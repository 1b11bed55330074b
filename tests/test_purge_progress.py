"""`manage.py purge_audits` reports each chunk per table as it goes, and can pause between chunks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from subscriptions.models import DeliveryAudit, RejectedRecord, Subscription

pytestmark = pytest.mark.django_db

OLD = datetime.now(UTC) - timedelta(days=40)


def test_progress_per_table_and_a_pause_between_chunks() -> None:
    stream = Subscription.objects.create(user="a", auth_method="bearer", opened_at=OLD, instance="web-1:1")
    DeliveryAudit.objects.bulk_create(
        DeliveryAudit(subscription=stream, event_id=f"{i}-0", event="E", status="delivered", sent_at=OLD)
        for i in range(10)
    )
    RejectedRecord.objects.bulk_create(
        RejectedRecord(received_at=OLD, topic="t", partition=0, offset=i, reason="not_json", value_size=1)
        for i in range(3)
    )
    out = StringIO()
    started = time.monotonic()
    call_command("purge_audits", "--older-than", "30d", "--chunk-size", "4", "--pause", "0.2", stdout=out)
    elapsed = time.monotonic() - started
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "  delivery audits: 4 deleted so far",
        "  delivery audits: 8 deleted so far",
        "  delivery audits: 10 deleted so far",
        "  rejected records: 3 deleted so far",
    ]
    assert lines[4].startswith("deleted 10 delivery audits, 0 broadcast rows, 0 closed streams, 3 rejected records")
    assert elapsed >= 4 * 0.2, "it paused after each of the 4 chunks"
    assert not DeliveryAudit.objects.exists()


def test_quiet_prints_only_the_summary_and_pause_is_bounded() -> None:
    out = StringIO()
    call_command("purge_audits", "--older-than", "30d", "--quiet", stdout=out)
    assert out.getvalue().startswith("deleted 0 delivery audits")
    with pytest.raises(CommandError, match="--pause takes seconds between 0 and 3600"):
        call_command("purge_audits", "--older-than", "30d", "--pause", "-1")
