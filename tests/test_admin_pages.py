"""The admin as an auditor reads it, in Debian's headless Chromium (Playwright) against a real web process.

Names read as words ("Broadcast deliveries"), timestamps carry milliseconds, the delivery list shows latency
without scrolling, stream ids stay on one line, the site says what it is, and the overview page counts
rejected records by reason over the last day and open streams per web process. Each page is also saved as a
PNG in .run/admin-screenshots/ (not committed) for a person to look at.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from playwright.async_api import Browser, Page, ViewportSize, expect

from subscriptions.models import BroadcastDelivery, DeliveryAudit, RejectedRecord, Subscription
from tests.harness import Gateway

pytestmark = pytest.mark.django_db(transaction=True)

SCREENSHOTS = Path(__file__).resolve().parent.parent / ".run" / "admin-screenshots"
PASSWORD = "admin-pages-test-password"
VIEWPORT: ViewportSize = {"width": 1366, "height": 900}

expect.set_options(timeout=20_000)


def _history() -> dict[str, object]:
    """An auditor's day: streams open on two web processes, deliveries with latencies, a broadcast, rejects."""
    now = datetime.now(UTC)
    hashed = PBKDF2PasswordHasher().encode(PASSWORD, "adminpagessalt", iterations=1000)
    get_user_model().objects.create(username="auditor", password=hashed, is_staff=True, is_superuser=True)
    sent = now.replace(microsecond=123_000) - timedelta(minutes=5)
    streams = []
    for i, instance in enumerate(["web-a:101"] * 3 + ["web-b:202"] * 2):
        streams.append(
            Subscription.objects.create(
                id=uuid.uuid4(),
                user=f"user-{i}",
                process_instances=["pi-1"],
                auth_method="session",
                opened_at=now - timedelta(minutes=30 - i),
                instance=instance,
            )
        )
    Subscription.objects.create(
        user="gone", auth_method="bearer", opened_at=now - timedelta(hours=2), closed_at=now, instance="web-c:303"
    )
    DeliveryAudit.objects.bulk_create(
        DeliveryAudit(
            subscription=stream,
            event_id=f"{int(sent.timestamp() * 1000)}-{i}",
            event="ProcessMetadata",
            status="delivered",
            user=stream.user,
            process_instance="pi-1",
            kafka_topic="messaging_events_topic",
            kafka_partition=0,
            kafka_offset=100 + i,
            sent_at=sent,
            latency_ms=12.345 + i,
        )
        for i, stream in enumerate(streams)
    )
    BroadcastDelivery.objects.create(
        event_id="1-0", event="Maintenance", instance="web-a:101", streams=3, sent_at=sent, latency_ms=4.5
    )
    reasons = ["not_json"] * 3 + ["no_target"] * 2 + ["bad_event"]
    RejectedRecord.objects.bulk_create(
        RejectedRecord(
            received_at=now - timedelta(hours=1),
            topic="messaging_events_topic",
            partition=0,
            offset=i,
            reason=reason,
            detail="-",
            value_size=3,
        )
        for i, reason in enumerate(reasons)
    )
    # Older than the overview's day: not counted.
    RejectedRecord.objects.create(
        received_at=now - timedelta(days=2),
        topic="t",
        partition=0,
        offset=99,
        reason="too_deep",
        detail="-",
        value_size=1,
    )
    return {"stream": streams[0], "sent": sent}


async def log_in(page: Page, base: str) -> None:
    await page.goto(base + "/admin/login/?next=/admin/")
    await page.fill("#id_username", "auditor")
    await page.fill("#id_password", PASSWORD)
    await page.click('input[type="submit"]')
    await page.wait_for_url(base + "/admin/")


async def shot(page: Page, name: str) -> None:
    await asyncio.to_thread(SCREENSHOTS.mkdir, parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def test_admin_pages_read_well(gateway: Gateway, browser: Browser) -> None:
    history = await sync_to_async(_history)()
    sent: datetime = history["sent"]  # type: ignore[assignment]
    stream: Subscription = history["stream"]  # type: ignore[assignment]
    page = await browser.new_page(viewport=VIEWPORT)
    await log_in(page, gateway.url)

    # The index: a site header, names as words, the overview linked.
    await expect(page.locator("#site-name")).to_have_text("events-gateway admin")
    await expect(page.get_by_role("link", name="Broadcast deliveries", exact=True)).to_be_visible()
    await expect(page.get_by_role("link", name="Streams", exact=True)).to_be_visible()
    await expect(page.get_by_role("link", name="Rejected records", exact=True)).to_be_visible()
    assert "deliverys" not in (await page.content()).lower()
    await shot(page, "index")

    # Deliveries: milliseconds, latency in view without scrolling, the stream id on one line.
    await page.goto(gateway.url + "/admin/subscriptions/deliveryaudit/")
    moment = sent.strftime("%Y-%m-%d %H:%M:%S.123")
    first = page.locator("#result_list tbody tr").first
    await expect(first.locator("td.field-sent")).to_have_text(moment)
    await expect(page.locator("#result_list thead th.column-sent")).to_contain_text("Sent at (UTC)")
    latency_cell = first.locator("td.field-latency")
    await expect(latency_cell).to_have_text("16.3 ms")
    box = await latency_cell.bounding_box()
    assert box is not None
    assert box["x"] + box["width"] <= VIEWPORT["width"], "latency is off-screen"
    await assert_one_line(first.locator("td.field-stream_link .stream-id"), first.locator("td.field-event"))
    await shot(page, "deliveries")

    # Streams: ids on one line, opened at with milliseconds.
    await page.goto(gateway.url + "/admin/subscriptions/subscription/")
    row = page.locator("#result_list tbody tr", has_text=str(stream.pk))
    await expect(row.locator(".field-opened")).to_have_text(
        stream.opened_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.") + f"{stream.opened_at.microsecond // 1000:03d}"
    )
    await assert_one_line(row.locator(".stream-id"), row.locator(".field-user"))
    await shot(page, "streams")

    # Broadcast deliveries: the plural and the millisecond.
    await page.goto(gateway.url + "/admin/subscriptions/broadcastdelivery/")
    await expect(page.locator("h1")).to_have_text("Select broadcast delivery to view")
    await expect(page.locator("td.field-sent").first).to_have_text(moment)
    await expect(page.locator("td.field-latency").first).to_have_text("4.5 ms")
    await shot(page, "broadcasts")

    # The overview, reached from the index.
    await page.goto(gateway.url + "/admin/")
    await page.get_by_role("link", name="Overview: rejected records by reason").click()
    await expect(page.locator("h1")).to_have_text("Overview")
    reasons = page.locator("#rejected-by-reason tbody tr")
    await expect(reasons).to_have_count(3)
    assert [await r.locator("td").all_inner_texts() for r in await reasons.all()] == [
        ["not_json", "3"],
        ["no_target", "2"],
        ["bad_event", "1"],
    ]
    await expect(page.locator("#rejected-by-reason tfoot")).to_contain_text("6")
    processes = page.locator("#open-streams tbody tr")
    await expect(processes).to_have_count(2)
    rows = [(await r.locator("td").all_inner_texts())[:2] for r in await processes.all()]
    assert rows == [["web-a:101", "3"], ["web-b:202", "2"]]
    await shot(page, "overview")

    # The reason links to the rejected records it counts.
    await page.get_by_role("link", name="no_target").click()
    await expect(page.locator("#result_list tbody tr")).to_have_count(2)
    await page.close()


async def assert_one_line(cell: object, one_line_reference: object) -> None:
    """`cell` is no taller than a cell holding one line of text in the same row."""
    box = await cell.bounding_box()  # type: ignore[attr-defined]
    reference = await one_line_reference.bounding_box()  # type: ignore[attr-defined]
    assert box is not None
    assert reference is not None
    assert box["height"] <= reference["height"] * 1.5, (box, reference)
