"""The admin as admins use it: who may see what, what search and filters return, grants acting on streams."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.db import models
from django.test import Client
from django.urls import reverse

from events.core import routing
from scripts.embedded import RedisServer, free_port
from subscriptions import admin as subscriptions_admin
from subscriptions.models import DeliveryAudit, Grant, RejectedRecord, Subscription

pytestmark = pytest.mark.django_db

NOW = datetime.now(UTC).replace(microsecond=0)


# --- data ------------------------------------------------------------------------------------------------
def stream(user: str, *, opened: datetime = NOW, closed: datetime | None = None, instance: str = "web-1:1") -> Any:
    return Subscription.objects.create(
        user=user, auth_method="session", opened_at=opened, closed_at=closed, instance=instance
    )


def delivery(
    sub: Subscription,
    event_id: str,
    *,
    status: str = "delivered",
    at: datetime = NOW,
    user: str = "",
    process_instance: str = "",
) -> DeliveryAudit:
    return DeliveryAudit.objects.create(
        subscription=sub,
        event_id=event_id,
        event="Data",
        status=status,
        user=user,
        process_instance=process_instance,
        kafka_topic="messaging_events_topic",
        kafka_partition=0,
        kafka_offset=int(event_id.split("-", maxsplit=1)[0]) % 1000,
        sent_at=at,
        latency_ms=12.5,
    )


def rejected(reason: str = "not_json", *, topic: str = "messaging_events_topic", offset: int = 7) -> RejectedRecord:
    return RejectedRecord.objects.create(
        received_at=NOW,
        topic=topic,
        partition=0,
        offset=offset,
        reason=reason,
        detail="broken",
        value_size=3,
    )


def url(model: type[models.Model], view: str = "changelist", *args: object) -> str:
    return reverse(f"admin:subscriptions_{model._meta.model_name}_{view}", args=args)


def listed(client: Client, model: type[models.Model], query: str = "") -> set[Any]:
    """The primary keys of the rows a changelist shows."""
    response = client.get(url(model) + query)
    assert response.status_code == 200
    return {obj.pk for obj in response.context["cl"].result_list}


# --- users -----------------------------------------------------------------------------------------------
@pytest.fixture
def superuser_client(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


@pytest.fixture
def viewer_client(client: Client) -> Client:
    """Staff with only the view permissions of this app."""
    user = User.objects.create_user("viewer", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="subscriptions", codename__startswith="view_")
    )
    client.force_login(user)
    return client


# --- who may see what ------------------------------------------------------------------------------------
def test_staff_with_view_permission_see_streams_deliveries_and_rejected_records(viewer_client: Client) -> None:
    sub = stream("alice")
    audit = delivery(sub, "1700000000000-0")
    record = rejected()

    for model, obj in ((Subscription, sub), (DeliveryAudit, audit), (RejectedRecord, record)):
        assert viewer_client.get(url(model)).status_code == 200
        detail = viewer_client.get(url(model, "change", obj.pk))
        assert detail.status_code == 200
    page = viewer_client.get(url(DeliveryAudit, "change", audit.pk)).content.decode()
    assert "1700000000000-0" in page
    assert url(Subscription, "change", sub.pk) in page  # the delivery links to its stream


@pytest.mark.parametrize("model", [DeliveryAudit, Subscription, RejectedRecord])
def test_nobody_may_add_change_or_delete_audit_records(superuser_client: Client, model: type[models.Model]) -> None:
    sub = stream("alice")
    obj: models.Model = sub
    if model is DeliveryAudit:
        obj = delivery(sub, "1700000000000-0")
    elif model is RejectedRecord:
        obj = rejected()
    model_admin = admin.site._registry[model]
    request = superuser_client.get(url(model)).wsgi_request

    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, obj)
    assert not model_admin.has_delete_permission(request, obj)
    assert model_admin.has_view_permission(request, obj)
    assert superuser_client.get(url(model, "add")).status_code == 403
    assert superuser_client.post(url(model, "add"), {}).status_code == 403
    assert superuser_client.post(url(model, "change", obj.pk), {"user": "mallory"}).status_code == 403
    assert superuser_client.get(url(model, "delete", obj.pk)).status_code == 403
    assert superuser_client.post(url(model, "delete", obj.pk), {"post": "yes"}).status_code == 403
    assert model._default_manager.filter(pk=obj.pk).exists()
    listing = superuser_client.get(url(model)).content.decode()
    assert url(model, "add") not in listing
    assert 'name="action"' not in listing  # no bulk delete either


def test_non_staff_and_anonymous_are_sent_to_the_login_page(client: Client) -> None:
    audit_list = url(DeliveryAudit)
    response = client.get(audit_list)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))

    client.force_login(User.objects.create_user("bob"))
    response = client.get(audit_list)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_staff_without_view_permission_are_refused(client: Client) -> None:
    client.force_login(User.objects.create_user("staff-only", is_staff=True))
    assert client.get(url(DeliveryAudit)).status_code == 403
    assert client.get(url(Grant)).status_code == 403


# --- search and filters ----------------------------------------------------------------------------------
@pytest.fixture
def deliveries() -> dict[str, Any]:
    """alice has two streams, bob one; a broadcast reached all three, a process event two, a user event one."""
    alice_1 = stream("alice", opened=NOW - timedelta(hours=3), closed=NOW - timedelta(hours=2))
    alice_2 = stream("alice", opened=NOW - timedelta(hours=1))
    bob = stream("bob", opened=NOW - timedelta(hours=1), instance="web-2:2")
    pi = "proc-42"
    rows = {
        "broadcast": [
            delivery(alice_1, "1700000000000-0", at=NOW - timedelta(hours=2, minutes=30)),
            delivery(bob, "1700000000000-0", status="replayed", at=NOW - timedelta(minutes=50)),
        ],
        "process": [
            delivery(alice_2, "1700000000100-1", process_instance=pi, at=NOW - timedelta(minutes=40)),
            delivery(bob, "1700000000100-1", process_instance=pi, status="dropped", at=NOW - timedelta(minutes=40)),
        ],
        "to_alice": [delivery(alice_2, "1700000000200-0", user="alice", at=NOW - timedelta(minutes=30))],
    }
    return {"streams": {"alice_1": alice_1, "alice_2": alice_2, "bob": bob}, "rows": rows, "pi": pi}


def pks(*audits: DeliveryAudit) -> set[int]:
    return {a.pk for a in audits}


def test_search_by_event_id_lists_every_stream_that_got_the_event(viewer_client: Client, deliveries: Any) -> None:
    assert listed(viewer_client, DeliveryAudit, "?q=1700000000000-0") == pks(*deliveries["rows"]["broadcast"])


def test_search_by_user_lists_deliveries_on_that_users_streams(viewer_client: Client, deliveries: Any) -> None:
    rows = deliveries["rows"]
    alice = pks(rows["broadcast"][0], rows["process"][0], rows["to_alice"][0])
    assert listed(viewer_client, DeliveryAudit, "?q=alice") == alice
    assert listed(viewer_client, DeliveryAudit, "?q=bob") == pks(rows["broadcast"][1], rows["process"][1])
    assert listed(viewer_client, DeliveryAudit, "?q=ali") == set()  # exact matches only


def test_search_by_process_instance_and_stream_id(viewer_client: Client, deliveries: Any) -> None:
    rows, streams = deliveries["rows"], deliveries["streams"]
    assert listed(viewer_client, DeliveryAudit, f"?q={deliveries['pi']}") == pks(*rows["process"])
    assert listed(viewer_client, DeliveryAudit, f"?q={streams['bob'].pk}") == pks(
        rows["broadcast"][1], rows["process"][1]
    )


def test_status_filter_and_search_combine(viewer_client: Client, deliveries: Any) -> None:
    rows = deliveries["rows"]
    assert listed(viewer_client, DeliveryAudit, "?status__exact=dropped") == pks(rows["process"][1])
    assert listed(viewer_client, DeliveryAudit, "?status__exact=replayed") == pks(rows["broadcast"][1])
    assert listed(viewer_client, DeliveryAudit, "?status__exact=delivered&q=alice") == pks(
        rows["broadcast"][0], rows["process"][0], rows["to_alice"][0]
    )


def test_a_streams_page_links_to_its_deliveries(viewer_client: Client, deliveries: Any) -> None:
    bob = deliveries["streams"]["bob"]
    page = viewer_client.get(url(Subscription, "change", bob.pk)).content.decode()
    query = f"?subscription__exact={bob.pk}"
    assert url(DeliveryAudit) + query in page
    assert listed(viewer_client, DeliveryAudit, query) == pks(
        deliveries["rows"]["broadcast"][1], deliveries["rows"]["process"][1]
    )


def test_date_hierarchy_offers_only_days_with_deliveries(viewer_client: Client) -> None:
    sub = stream("alice", opened=datetime(2025, 3, 1, tzinfo=UTC))
    delivery(sub, "1740787200000-0", at=datetime(2025, 3, 2, 10, tzinfo=UTC))
    delivery(sub, "1741219200000-0", at=datetime(2025, 3, 6, 23, 59, tzinfo=UTC))
    delivery(sub, "1741219200001-0", at=datetime(2025, 3, 6, 1, tzinfo=UTC))

    page = viewer_client.get(url(DeliveryAudit) + "?sent_at__year=2025&sent_at__month=3").content.decode()
    assert {int(day) for day in re.findall(r"sent_at__day=(\d+)", page)} == {2, 6}
    march_6 = listed(viewer_client, DeliveryAudit, "?sent_at__year=2025&sent_at__month=3&sent_at__day=6")
    assert len(march_6) == 2


def test_open_streams_filter_and_instance_filter(viewer_client: Client) -> None:
    open_1 = stream("alice", instance="web-1:1")
    open_2 = stream("bob", instance="web-2:2")
    closed = stream("carol", opened=NOW - timedelta(hours=2), closed=NOW - timedelta(hours=1), instance="web-1:1")

    assert listed(viewer_client, Subscription, "?state=open") == {open_1.pk, open_2.pk}
    assert listed(viewer_client, Subscription, "?state=closed") == {closed.pk}
    assert listed(viewer_client, Subscription, "?state=open&instance=web-1:1") == {open_1.pk}
    page = viewer_client.get(url(Subscription)).content.decode()
    assert "?instance=web-1%3A1" in page
    assert "?instance=web-2%3A2" in page
    assert listed(viewer_client, Subscription, "?q=carol") == {closed.pk}


def test_rejected_records_filter_by_reason_and_topic_and_search_by_coordinates(viewer_client: Client) -> None:
    not_json = rejected("not_json", offset=1)
    no_target = rejected("no_target", offset=2)
    other_topic = rejected("not_json", topic="engine_topic", offset=3)

    assert listed(viewer_client, RejectedRecord, "?reason=not_json") == {not_json.pk, other_topic.pk}
    assert listed(viewer_client, RejectedRecord, "?topic=engine_topic") == {other_topic.pk}
    assert listed(viewer_client, RejectedRecord, "?q=messaging_events_topic/0/2") == {no_target.pk}
    assert listed(viewer_client, RejectedRecord, "?q=no_target") == {no_target.pk}


def test_counts_stop_at_the_cap_on_large_lists(
    viewer_client: Client, deliveries: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the cap at 2, the 3 delivered rows show as "2+" and pages go only 2 rows deep."""
    monkeypatch.setattr(subscriptions_admin.CappedPaginator, "cap", 2)
    monkeypatch.setattr(subscriptions_admin.DeliveryAuditAdmin, "list_per_page", 1)
    delivered = url(DeliveryAudit) + "?status__exact=delivered"

    page = viewer_client.get(delivered)

    assert "2+ delivery audits" in page.content.decode()
    assert len(page.context["cl"].result_list) == 1
    assert viewer_client.get(delivered + "&p=2").status_code == 200
    assert viewer_client.get(delivered + "&p=3").status_code == 302  # deeper than the cap: refused


# --- grants ----------------------------------------------------------------------------------------------
@pytest.fixture
def store(redis_server: RedisServer, settings: Any) -> Iterator[redis.Redis]:
    """The Redis event store the admin writes grant changes to, empty at the start."""
    settings.REDIS_URL = redis_server.url
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


def grant_events(store: Any) -> list[dict[str, str]]:
    return [
        {"type": f["type"], "user": f["user"], "processInstanceUuid": f["processInstanceUuid"]}
        for _, f in store.xrange(routing.EVENTS_STREAM)
    ]


def test_granting_in_the_admin_stores_a_connect_event(superuser_client: Client, store: redis.Redis) -> None:
    response = superuser_client.post(url(Grant, "add"), {"user": "alice", "process_instance": "proc-1"})

    assert response.status_code == 302
    grant = Grant.objects.get(user="alice", process_instance="proc-1")
    assert grant.active
    assert grant.source == "admin"
    assert grant.granted_by == "admin root"
    assert grant_events(store) == [{"type": "connect", "user": "alice", "processInstanceUuid": "proc-1"}]


def test_granting_twice_is_refused_with_a_form_error(superuser_client: Client, store: redis.Redis) -> None:
    superuser_client.post(url(Grant, "add"), {"user": "alice", "process_instance": "proc-1"})
    response = superuser_client.post(url(Grant, "add"), {"user": "alice", "process_instance": "proc-1"})

    assert response.status_code == 200
    assert "already holds an active grant" in response.content.decode()
    assert Grant.objects.filter(user="alice").count() == 1
    assert len(grant_events(store)) == 1


def active_grant(user: str = "alice", process_instance: str = "proc-1") -> Grant:
    return Grant.objects.create(
        user=user, process_instance=process_instance, granted_at=NOW, granted_by="kafka t/0/1", source="kafka"
    )


def test_revoking_in_the_admin_ends_the_grant_and_stores_a_disconnect_event(
    superuser_client: Client, store: redis.Redis
) -> None:
    alice, bob, untouched = active_grant("alice"), active_grant("bob"), active_grant("carol")

    response = superuser_client.post(
        url(Grant), {"action": "revoke_selected", "_selected_action": [alice.pk, bob.pk]}, follow=True
    )

    assert "Revoked 2 grant(s)" in response.content.decode()
    for grant in (alice, bob):
        grant.refresh_from_db()
        assert not grant.active
        assert grant.revoked_by == "admin root"
    untouched.refresh_from_db()
    assert untouched.active
    assert sorted(grant_events(store), key=lambda e: e["user"]) == [
        {"type": "disconnect", "user": "alice", "processInstanceUuid": "proc-1"},
        {"type": "disconnect", "user": "bob", "processInstanceUuid": "proc-1"},
    ]
    assert listed(superuser_client, Grant, "?state=active") == {untouched.pk}


def test_revoking_from_the_grants_page(superuser_client: Client, store: redis.Redis) -> None:
    grant = active_grant()

    response = superuser_client.post(url(Grant, "change", grant.pk), {"revoke": "on"})

    assert response.status_code == 302
    grant.refresh_from_db()
    assert not grant.active
    assert grant_events(store) == [{"type": "disconnect", "user": "alice", "processInstanceUuid": "proc-1"}]


def test_grant_changes_are_not_made_when_redis_is_down(superuser_client: Client, settings: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    grant = active_grant()

    revoke = superuser_client.post(
        url(Grant), {"action": "revoke_selected", "_selected_action": [grant.pk]}, follow=True
    )
    add = superuser_client.post(url(Grant, "add"), {"user": "bob", "process_instance": "proc-2"}, follow=True)

    grant.refresh_from_db()
    assert grant.active
    assert not Grant.objects.filter(user="bob").exists()
    for response in (revoke, add):
        assert response.status_code == 200
        assert "open streams could not be told" in response.content.decode().lower()


def test_grants_cannot_be_deleted(superuser_client: Client) -> None:
    grant = active_grant()
    assert superuser_client.get(url(Grant, "delete", grant.pk)).status_code == 403
    assert Grant.objects.filter(pk=grant.pk).exists()


def test_a_delivery_shows_its_event_as_stored_in_redis(viewer_client: Client, store: redis.Redis) -> None:
    event_id = "1700000000000-5"
    store.xadd(
        routing.EVENTS_STREAM,
        {"event_id": event_id, "type": "message", "event": "Data", "user": "alice", "data": '{"x": 1}'},
        id=event_id,
    )
    sub = stream("alice")
    stored = delivery(sub, event_id)
    gone = delivery(sub, "1600000000000-0")

    page = viewer_client.get(url(DeliveryAudit, "change", stored.pk)).content.decode()
    assert "&quot;x&quot;: 1" in page
    page = viewer_client.get(url(DeliveryAudit, "change", gone.pk)).content.decode()
    assert "no longer stored" in page


def test_streams_are_found_by_exact_stream_id(viewer_client: Client) -> None:
    sub = stream("alice")
    stream("bob")
    assert listed(viewer_client, Subscription, f"?q={sub.pk}") == {sub.pk}
    assert listed(viewer_client, Subscription, f"?q={str(sub.pk)[:8]}") == set()
