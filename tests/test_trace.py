"""The delivery trace: why a stream did or did not get an event, answered from the store and the audits.

Unit tests of subscriptions.trace against a real Redis (events appended by the store's own script) and the
test database; the admin page's form and permissions through Django's client; and one end-to-end run: a
real stream on a real gateway, then the trace page in Chromium.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from playwright.async_api import Browser, expect

from events.core import routing
from events.core.envelope import Event
from events.core.records import Record
from events.core.store import EventStore
from scripts.embedded import RedisServer, free_port
from subscriptions import services
from subscriptions.models import BroadcastDelivery, DeliveryAudit, Grant, RejectedRecord, Subscription
from subscriptions.trace import StoreUnavailable, Trace, Verdict, delivery_trace
from tests.harness import Gateway, token, wait_until
from tests.sse_client import open_stream

TOPIC = "messaging_events_topic"


# --- data ------------------------------------------------------------------------------------------------
@pytest.fixture
def store(redis_server: RedisServer, settings: Any) -> str:
    """The event store the trace reads (a Redis of the test's own); its URL."""
    settings.REDIS_URL = redis_server.url
    return redis_server.url


class Appender:
    """Stores events with the store's own append script, each at the next offset of TOPIC/0."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.offset = 100

    def __call__(
        self,
        *,
        user: str | None = None,
        process_instance: str | None = None,
        broadcast: bool = False,
        kind: str = "message",
        producer_id: str | None = None,
        published: datetime | None = None,
    ) -> str:
        event = Event(kind, "Data" if kind == "message" else kind, user, process_instance, broadcast, "1", producer_id)
        published_ms = int((published or timezone.now()).timestamp() * 1000)
        self.offset += 1
        record = Record(TOPIC, 0, self.offset, published_ms, event)

        async def append() -> list[str]:
            client = aioredis.from_url(self.url)
            try:
                store = EventStore(client, retention_seconds=django_settings.EVENTS_RETENTION_SECONDS)
                return await store.append([record])
            finally:
                await client.aclose()

        [event_id] = asyncio.run(append())
        assert event_id not in ("", "dup")
        return event_id


@pytest.fixture
def append(store: str) -> Appender:
    return Appender(store)


def stored_at(event_id: str) -> datetime:
    return datetime.fromtimestamp(int(event_id.split("-", maxsplit=1)[0]) / 1000, UTC)


def stream(
    user: str = "alice",
    *,
    opened: datetime | None = None,
    closed: datetime | None = None,
    reason: str = "",
    follows: tuple[str, ...] = (),
    resumed_from: str = "",
    instance: str = "web-1:1",
) -> Subscription:
    return Subscription.objects.create(
        user=user,
        process_instances=sorted(follows),
        auth_method="bearer",
        opened_at=opened or timezone.now() - timedelta(minutes=1),
        closed_at=closed,
        close_reason=reason,
        resumed_from=resumed_from,
        instance=instance,
    )


def audit(sub: Subscription, event_id: str, status: str, *, sent: datetime, latency_ms: float = 40.0) -> None:
    DeliveryAudit.objects.create(
        subscription=sub,
        event_id=event_id,
        event="Data",
        status=status,
        kafka_topic=TOPIC,
        kafka_partition=0,
        kafka_offset=1,
        sent_at=sent,
        latency_ms=latency_ms,
    )


def grant(user: str, process_instance: str, *, recorded: datetime) -> Grant:
    return Grant.objects.create(
        user=user,
        process_instance=process_instance,
        granted_at=recorded,
        recorded_at=recorded,
        granted_by="kafka t/0/1",
        source="kafka",
    )


def on(sub: Subscription, *, now: datetime | None = None, **event: Any) -> Any:
    """The one answer for `sub`."""
    result = delivery_trace(stream_id=sub.pk, now=now, **event)
    [answer] = result.answers
    assert answer.stream_id == sub.pk
    return answer


def later(event_id: str) -> datetime:
    """A time well after the event, when its audit rows would have been written."""
    return stored_at(event_id) + timedelta(minutes=1)


# --- delivered, replayed, dropped ------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_delivered_event_says_when_and_how_late(append: Appender) -> None:
    published = timezone.now() - timedelta(milliseconds=250)
    event_id = append(user="alice", published=published)
    sub = stream()
    sent = stored_at(event_id) + timedelta(milliseconds=30)
    audit(sub, event_id, "delivered", sent=sent, latency_ms=280.0)

    answer = on(sub, event_id=event_id)

    assert answer.verdict == Verdict.DELIVERED
    assert answer.received
    assert answer.at == sent
    assert answer.after_published_ms == 280.0
    assert answer.after_stored_ms == pytest.approx(30.0)
    assert "280.0 ms after it was published" in answer.summary
    assert "30.0 ms after it was stored" in answer.summary


@pytest.mark.django_db
def test_a_replayed_event_names_where_the_stream_resumed(append: Appender) -> None:
    earlier = append(user="alice")
    event_id = append(user="alice")
    sub = stream(opened=stored_at(event_id) + timedelta(seconds=5), resumed_from=earlier)
    audit(sub, event_id, "replayed", sent=sub.opened_at)

    answer = on(sub, event_id=event_id)

    assert answer.verdict == Verdict.REPLAYED
    assert f"resumed from {earlier}" in answer.summary
    assert answer.after_stored_ms == pytest.approx(5000.0)


@pytest.mark.django_db
def test_a_dropped_event_gives_the_streams_close_reason(append: Appender) -> None:
    event_id = append(user="alice")
    sub = stream(closed=stored_at(event_id) + timedelta(seconds=1), reason="slow_client")
    audit(sub, event_id, "dropped", sent=sub.closed_at or timezone.now())

    answer = on(sub, event_id=event_id)

    assert answer.verdict == Verdict.DROPPED
    assert not answer.received
    assert "client fell too far behind" in answer.summary


@pytest.mark.django_db
def test_a_live_broadcast_is_found_by_its_web_process_row(append: Appender) -> None:
    event_id = append(broadcast=True)
    sub = stream(instance="web-a:1")
    elsewhere = stream(instance="web-b:2")
    BroadcastDelivery.objects.create(
        event_id=event_id, event="Data", instance="web-a:1", streams=3, sent_at=stored_at(event_id), latency_ms=9.0
    )

    answer = on(sub, event_id=event_id, now=later(event_id))
    other = on(elsewhere, event_id=event_id, now=later(event_id))

    assert answer.verdict == Verdict.DELIVERED
    assert "broadcast by web-a:1" in answer.summary
    # web-b handed it out to nobody: its stream should have had it, and no audit says it did.
    assert other.verdict == Verdict.UNRECORDED


# --- why not: the audience, following, grants ------------------------------------------------------------
@pytest.mark.django_db
def test_an_event_for_another_user_is_outside_the_audience(append: Appender) -> None:
    event_id = append(user="bob")

    answer = on(stream("alice"), event_id=event_id)

    assert answer.verdict == Verdict.AUDIENCE
    assert "addressed to bob, not to alice" in answer.summary


@pytest.mark.django_db
def test_a_process_event_with_a_user_filter_excludes_the_other_followers(append: Appender) -> None:
    grant("alice", "pi-1", recorded=timezone.now() - timedelta(hours=1))
    event_id = append(process_instance="pi-1", user="bob")

    answer = on(stream("alice", follows=("pi-1",)), event_id=event_id)

    assert answer.verdict == Verdict.AUDIENCE
    assert "for bob's streams only (a user filter)" in answer.summary


@pytest.mark.django_db
def test_the_audience_is_decided_by_routing_visible_to(append: Appender, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace asks the rule live delivery uses; it keeps no copy of it."""
    event_id = append(user="bob")
    sub = stream("alice")
    monkeypatch.setattr(routing, "visible_to", lambda **_: True)

    answer = on(sub, event_id=event_id, now=later(event_id))

    assert answer.verdict == Verdict.UNRECORDED


@pytest.mark.django_db
def test_a_process_instance_the_stream_did_not_ask_for(append: Appender) -> None:
    grant("alice", "pi-1", recorded=timezone.now() - timedelta(hours=1))
    event_id = append(process_instance="pi-1")

    answer = on(stream("alice", follows=("pi-2",)), event_id=event_id)

    assert answer.verdict == Verdict.NOT_FOLLOWED
    assert "did not follow pi-1: it asked for pi-2" in answer.summary


@pytest.mark.django_db
def test_a_grant_given_after_the_stream_opened_does_not_reach_it(append: Appender) -> None:
    sub = stream("alice", opened=timezone.now() - timedelta(minutes=5))
    grant("alice", "pi-1", recorded=timezone.now() - timedelta(minutes=1))
    event_id = append(process_instance="pi-1")

    answer = on(sub, event_id=event_id)

    assert answer.verdict == Verdict.NOT_FOLLOWED
    assert "after the stream opened" in answer.summary
    assert "only a new stream" in answer.summary


@pytest.mark.django_db
def test_no_grant_at_the_events_time(append: Appender) -> None:
    # A grant that ended before the event, and one given after it: neither covers it.
    old = grant("alice", "pi-1", recorded=timezone.now() - timedelta(hours=2))
    services.grant_revoke(user="alice", process_instance="pi-1", revoked_by="kafka t/0/9", at=timezone.now())
    event_id = append(process_instance="pi-1")
    grant("alice", "pi-1", recorded=timezone.now() + timedelta(minutes=1))

    answer = on(stream("alice"), event_id=event_id)

    assert answer.verdict == Verdict.NO_GRANT
    assert "held no grant for process instance pi-1" in answer.summary
    assert any(f"Grant {old.pk}:" in line and "revoked at" in line for line in answer.evidence)


@pytest.mark.django_db
def test_a_grant_revoked_while_the_stream_was_open(append: Appender) -> None:
    grant("alice", "pi-1", recorded=timezone.now() - timedelta(hours=1))
    sub = stream("alice", follows=("pi-1",), opened=timezone.now() - timedelta(minutes=2))
    before = append(process_instance="pi-1")
    assert services.grant_revoke(user="alice", process_instance="pi-1", revoked_by="kafka t/0/7", at=timezone.now())
    after = append(process_instance="pi-1")

    revoked = on(sub, event_id=after, now=later(after))
    still_following = on(sub, event_id=before, now=later(before))

    assert revoked.verdict == Verdict.REVOKED
    assert "kafka t/0/7" in revoked.summary
    assert "stopped following pi-1" in revoked.summary
    # The event stored before the revocation was the stream's to get.
    assert still_following.verdict == Verdict.UNRECORDED


@pytest.mark.django_db
def test_revocations_count_from_when_the_gateway_applied_them(append: Appender) -> None:
    """A lagging consumer applies a disconnect long after its record's timestamp: until then streams follow."""
    grant("alice", "pi-1", recorded=timezone.now() - timedelta(hours=1))
    sub = stream("alice", follows=("pi-1",), opened=timezone.now() - timedelta(minutes=30))
    event_id = append(process_instance="pi-1")
    services.grant_revoke(
        user="alice", process_instance="pi-1", revoked_by="kafka t/0/8", at=timezone.now() - timedelta(minutes=10)
    )

    answer = on(sub, event_id=event_id, now=later(event_id))

    revoked = Grant.objects.get(user="alice")
    assert revoked.revoked_at is not None
    assert revoked.revoke_recorded_at is not None
    assert revoked.revoked_at < stored_at(event_id) < revoked.revoke_recorded_at
    assert answer.verdict == Verdict.UNRECORDED


# --- why not: when the stream was open -------------------------------------------------------------------
@pytest.mark.django_db
def test_a_stream_closed_before_the_event(append: Appender) -> None:
    sub = stream(closed=timezone.now() - timedelta(seconds=30), reason="auth_expired")
    event_id = append(user="alice")

    answer = on(sub, event_id=event_id)

    assert answer.verdict == Verdict.CLOSED
    assert "bearer token expired" in answer.summary
    assert "before the event was stored" in answer.summary


@pytest.mark.django_db
def test_a_stream_opened_after_the_event_without_resuming(append: Appender) -> None:
    event_id = append(user="alice")
    sub = stream(opened=stored_at(event_id) + timedelta(seconds=20))

    answer = on(sub, event_id=event_id)

    assert answer.verdict == Verdict.NOT_OPEN
    assert "had no Last-Event-ID" in answer.summary


@pytest.mark.django_db
def test_a_stream_that_resumed_from_before_the_event_should_have_replayed_it(append: Appender) -> None:
    earlier = append(user="alice")
    event_id = append(user="alice")
    sub = stream(opened=stored_at(event_id) + timedelta(seconds=20), resumed_from=earlier)

    answer = on(sub, event_id=event_id, now=later(event_id))

    assert answer.verdict == Verdict.UNRECORDED
    assert "should have been replayed" in answer.summary


@pytest.mark.django_db
def test_an_answer_moments_after_the_event_waits_for_the_audit(append: Appender) -> None:
    event_id = append(user="alice")

    answer = on(stream(), event_id=event_id, now=stored_at(event_id) + timedelta(seconds=1))

    assert answer.verdict == Verdict.PENDING


@pytest.mark.django_db
def test_without_delivery_audits_the_trace_says_what_should_have_happened(append: Appender, settings: Any) -> None:
    settings.AUDIT_DELIVERIES = "failures"
    event_id = append(user="alice")

    answer = on(stream(), event_id=event_id, now=later(event_id))

    assert answer.verdict == Verdict.EXPECTED
    assert "only drops are audited" in answer.summary


# --- the event itself ------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_an_event_older_than_retention_is_no_longer_held_but_its_audits_still_answer(store: str) -> None:
    old = timezone.now() - timedelta(seconds=django_settings.EVENTS_RETENTION_SECONDS + 600)
    event_id = f"{int(old.timestamp() * 1000)}-0"
    got_it = stream(opened=old - timedelta(minutes=1))
    audit(got_it, event_id, "delivered", sent=old)

    delivered = on(got_it, event_id=event_id)
    gone = on(stream(opened=old - timedelta(minutes=1)), event_id=event_id)

    assert delivered.verdict == Verdict.DELIVERED
    assert gone.verdict == Verdict.NOT_HELD
    assert "EVENTS_RETENTION_SECONDS" in gone.summary


@pytest.mark.django_db
@pytest.mark.parametrize("offset", [timedelta(minutes=-1), timedelta(days=2)])
def test_an_id_the_store_never_issued_is_unknown(append: Appender, offset: timedelta) -> None:
    append(user="alice")
    event_id = f"{int((timezone.now() + offset).timestamp() * 1000)}-7"

    result = delivery_trace(stream_id=stream().pk, event_id=event_id)

    assert result.event.verdict == Verdict.UNKNOWN_EVENT
    assert result.answers[0].verdict == Verdict.UNKNOWN_EVENT


@pytest.mark.django_db
def test_ids_are_read_as_the_store_writes_them(append: Appender) -> None:
    event_id = append(user="alice")
    ms, seq = event_id.split("-")
    sub = stream()
    audit(sub, event_id, "delivered", sent=timezone.now())

    assert on(sub, event_id=f"00{ms}-0{seq}").verdict == Verdict.DELIVERED
    # The largest id the pattern takes is past any date: unknown, not an error.
    result = delivery_trace(stream_id=sub.pk, event_id="999999999999999-999999999999999")
    assert result.event.verdict == Verdict.UNKNOWN_EVENT


@pytest.mark.django_db
def test_a_grant_change_is_not_an_event_streams_receive(append: Appender) -> None:
    event_id = append(kind="disconnect", user="alice", process_instance="pi-1")

    answer = on(stream(follows=("pi-1",)), event_id=event_id)

    assert answer.verdict == Verdict.GRANT_CHANGE
    assert "unsubscribed" in answer.summary


@pytest.mark.django_db
def test_a_dead_lettered_record_by_its_kafka_coordinates_and_by_its_producer_id(store: str) -> None:
    value = json.dumps({"id": "order-17", "user": "alice", "event": "bad name!", "data": 1})
    RejectedRecord.objects.create(
        received_at=timezone.now(),
        topic=TOPIC,
        partition=2,
        offset=40,
        reason="bad_event",
        detail="event must match ^[A-Za-z0-9_.:-]{1,64}$",
        value_preview=value,
        value_size=len(value),
    )
    sub = stream()

    by_record = on(sub, kafka_record=(TOPIC, 2, 40))
    by_producer_id = on(sub, producer_id="order-17")
    # Another record merely mentioning the id elsewhere in its value is not it.
    unrelated = on(sub, producer_id="bad name!")

    for answer in (by_record, by_producer_id):
        assert answer.verdict == Verdict.DEAD_LETTERED
        assert "bad_event (event must match" in answer.summary
        assert f"{TOPIC}/2/40" in answer.summary
    assert unrelated.verdict == Verdict.UNKNOWN_EVENT


@pytest.mark.django_db
def test_a_producer_id_finds_the_stored_event(append: Appender) -> None:
    event_id = append(user="alice", producer_id="order-18")
    sub = stream()
    audit(sub, event_id, "delivered", sent=timezone.now())

    result = delivery_trace(stream_id=sub.pk, producer_id="order-18")

    assert result.event.event_id == event_id
    assert result.answers[0].verdict == Verdict.DELIVERED


@pytest.mark.django_db
def test_a_kafka_record_not_consumed_yet(append: Appender) -> None:
    append(user="alice")  # the store holds TOPIC/0 up to offset 101

    result = delivery_trace(stream_id=stream().pk, kafka_record=(TOPIC, 0, 500))

    assert result.event.verdict == Verdict.NOT_CONSUMED
    assert "up to offset 101" in result.event.summary


@pytest.mark.django_db
def test_an_unknown_stream(store: str) -> None:
    result = delivery_trace(stream_id=uuid.uuid4(), event_id="1700000000000-0")

    assert result.answers[0].verdict == Verdict.UNKNOWN_STREAM


@pytest.mark.django_db
def test_redis_down_is_said_not_raised_as_a_server_error(settings: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreUnavailable, match="Redis could not be reached"):
        delivery_trace(stream_id=uuid.uuid4(), event_id="1700000000000-0")


# --- a user's streams ------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_users_streams_around_the_event_each_get_an_answer(append: Appender) -> None:
    now = timezone.now()
    long_gone = stream(opened=now - timedelta(hours=2), closed=now - timedelta(hours=1), reason="client_gone")
    closed_just_before = stream(
        opened=now - timedelta(minutes=20), closed=now - timedelta(minutes=1), reason="client_gone"
    )
    open_one = stream(opened=now - timedelta(minutes=10))
    stream("bob")
    event_id = append(user="alice")
    audit(open_one, event_id, "delivered", sent=stored_at(event_id) + timedelta(milliseconds=5))
    reopened = stream(opened=stored_at(event_id) + timedelta(seconds=3))

    result: Trace = delivery_trace(user="alice", event_id=event_id)

    verdicts = {a.stream_id: a.verdict for a in result.answers}
    assert verdicts == {
        reopened.pk: Verdict.NOT_OPEN,
        open_one.pk: Verdict.DELIVERED,
        closed_just_before.pk: Verdict.CLOSED,
    }
    assert long_gone.pk not in verdicts
    assert result.user_in_audience is True
    assert result.answers[0].stream_id == reopened.pk  # the newest first


@pytest.mark.django_db
def test_a_user_outside_the_audience_is_told_so_even_with_no_stream_open(append: Appender) -> None:
    event_id = append(user="bob")

    result = delivery_trace(user="alice", event_id=event_id)

    assert result.answers == []
    assert result.user_in_audience is False


# --- the admin page: form, permissions, links ------------------------------------------------------------
def trace_url(**params: str) -> str:
    return reverse("admin:subscriptions_trace") + (
        "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""
    )


@pytest.fixture
def viewer(client: Client) -> Client:
    user = User.objects.create_user("viewer", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="subscriptions", codename__startswith="view_")
    )
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_only_staff_with_the_view_permissions_may_trace(client: Client, store: str) -> None:
    assert client.get(trace_url()).status_code == 302  # to the login page
    staff = User.objects.create_user("staff", is_staff=True)
    client.force_login(staff)
    assert client.get(trace_url()).status_code == 403
    staff.user_permissions.set(
        Permission.objects.filter(content_type__app_label="subscriptions", codename="view_subscription")
    )
    assert client.get(trace_url()).status_code == 403
    staff.user_permissions.set(
        Permission.objects.filter(content_type__app_label="subscriptions", codename__startswith="view_")
    )
    assert client.get(trace_url()).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"stream": "not-a-uuid", "event": "1700000000000-0"}, "valid UUID"),
        ({"stream": str(uuid.uuid4()), "event": "1700000000000-0-1"}, "Enter an event id"),
        ({"stream": str(uuid.uuid4()), "event": "%D9%A1%D9%A2-0"}, "Enter an event id"),  # Arabic-Indic digits
        ({"stream": str(uuid.uuid4()), "event": "%3Cscript%3E"}, "Enter an event id"),
        ({"stream": str(uuid.uuid4()), "event": "a%20b/1/2"}, "Enter an event id"),  # no such topic name
        ({"stream": str(uuid.uuid4()), "event": "1" * 301}, "at most 300 characters"),
        ({"stream": str(uuid.uuid4()), "event": "1700000000000-0%00"}, "Null characters"),
        ({"user": "a" * 151, "event": "1700000000000-0"}, "at most 150 characters"),
        ({"stream": str(uuid.uuid4()), "user": "alice", "event": "1700000000000-0"}, "either a stream id or a user"),
        ({"event": "1700000000000-0"}, "either a stream id or a user"),
        ({"user": "alice"}, "by its id or Kafka record, or by its producer id"),
        ({"user": "alice", "event": "1-0", "producer_id": "p"}, "by its id or Kafka record, or by its producer id"),
    ],
)
def test_hostile_input_gets_a_form_error(viewer: Client, store: str, params: dict[str, str], error: str) -> None:
    response = viewer.get(trace_url(**params))

    assert response.status_code == 200
    assert error in response.content.decode()
    assert response.context["trace"] is None


@pytest.mark.django_db
def test_redis_down_is_a_form_error_on_the_page(viewer: Client, settings: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"

    response = viewer.get(trace_url(user="alice", event="1700000000000-0"))

    assert response.status_code == 200
    assert "Redis could not be reached" in response.content.decode()


@pytest.mark.django_db
def test_streams_and_deliveries_link_to_the_trace(viewer: Client, append: Appender) -> None:
    event_id = append(user="alice")
    sub = stream()
    audit(sub, event_id, "delivered", sent=timezone.now())
    row = DeliveryAudit.objects.get()

    stream_page = viewer.get(reverse("admin:subscriptions_subscription_change", args=[sub.pk])).content.decode()
    delivery_page = viewer.get(reverse("admin:subscriptions_deliveryaudit_change", args=[row.pk])).content.decode()

    assert trace_url(stream=str(sub.pk)) in stream_page
    assert trace_url(stream=str(sub.pk), event=event_id).replace("&", "&amp;") in delivery_page
    for changelist in ("subscription", "deliveryaudit"):
        page = viewer.get(reverse(f"admin:subscriptions_{changelist}_changelist")).content.decode()
        assert f'href="{trace_url()}" class="trace-link"' in page
    answer = viewer.get(trace_url(stream=str(sub.pk), event=event_id))
    assert answer.context["trace"].answers[0].verdict == Verdict.DELIVERED


# --- end to end ------------------------------------------------------------------------------------------
PASSWORD = "trace-test-password"
SCREENSHOTS = Path(__file__).resolve().parent.parent / ".run" / "admin-screenshots"  # not committed


def _auditor() -> None:
    hashed = PBKDF2PasswordHasher().encode(PASSWORD, "tracesalt", iterations=1000)
    get_user_model().objects.create(username="support", password=hashed, is_staff=True, is_superuser=True)


@pytest.mark.django_db(transaction=True)
async def test_the_trace_page_explains_a_real_stream(gateway: Gateway, browser: Browser) -> None:
    """A stream of alice following one process instance gets one event and not two others; the page says why."""
    await sync_to_async(_auditor)()
    await Grant.objects.acreate(
        user="alice", process_instance="pi-e2e", granted_at=timezone.now(), granted_by="test", source="admin"
    )
    async with await open_stream(gateway.url, token=token("alice"), params=[("processInstanceUuid", "pi-e2e")]) as sse:
        await sse.next_block()  # registered: what is stored from now on is its to get
        await gateway.produce({"user": "bob", "event": "ForBob", "data": 1}, key="k")
        await gateway.produce({"processInstanceUuid": "pi-other", "event": "Elsewhere", "data": 2}, key="k")
        await gateway.produce({"processInstanceUuid": "pi-e2e", "event": "Mine", "data": 3}, key="k")
        [mine] = await sse.events(1)
    sub = await wait_until(
        lambda: Subscription.objects.filter(user="alice", closed_at__isnull=False).afirst(), what="the stream row"
    )
    await wait_until(
        lambda: DeliveryAudit.objects.filter(subscription=sub, event_id=mine.id).aexists(), what="its delivery row"
    )
    ids = await wait_until(lambda: _stored_ids(gateway), what="the three events stored")

    page = await browser.new_page()
    await page.goto(gateway.url + "/admin/login/?next=/admin/")
    await page.fill("#id_username", "support")
    await page.fill("#id_password", PASSWORD)
    await page.click('input[type="submit"]')
    await page.wait_for_url(gateway.url + "/admin/")
    # From the stream's page to the trace, then the event's id typed in.
    await page.goto(gateway.url + reverse("admin:subscriptions_subscription_change", args=[sub.pk]))
    await page.get_by_role("link", name="why did this stream (not) get an event?").click()
    expected = {"ForBob": "not in the event's audience", "Elsewhere": "no grant", "Mine": "delivered"}
    for name, verdict in expected.items():
        await page.fill("#id_event", ids[name])
        await page.click('input[type="submit"]')
        row = page.locator("#trace-streams tbody tr")
        await expect(row).to_have_count(1)
        await expect(row.locator("td.trace-verdict")).to_have_text(verdict)
        await expect(row).to_contain_text(str(sub.pk))
    await expect(page.locator(".trace-summary")).to_contain_text("ms after it was published")
    await page.fill("#id_stream", "")
    await page.fill("#id_user", "alice")
    await page.fill("#id_event", ids["Elsewhere"])
    await page.click('input[type="submit"]')
    await expect(page.locator("#trace-streams td.trace-verdict")).to_have_text("no grant")
    await asyncio.to_thread(SCREENSHOTS.mkdir, parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "trace.png"), full_page=True)
    # A hostile id: a form error, not a server error.
    await page.fill("#id_event", "1' OR '1'='1")
    await page.click('input[type="submit"]')
    await expect(page.locator(".errorlist")).to_contain_text("Enter an event id")
    await page.close()


async def _stored_ids(gateway: Gateway) -> dict[str, str] | None:
    """The stored events' ids by event name, once all three are stored."""
    client = aioredis.from_url(gateway.env["REDIS_URL"], decode_responses=True)
    try:
        entries: Any = await client.xrange(routing.EVENTS_STREAM)
    finally:
        await client.aclose()
    ids = {fields["event"]: entry_id for entry_id, fields in entries if fields["type"] == "message"}
    return ids if len(ids) == 3 else None
