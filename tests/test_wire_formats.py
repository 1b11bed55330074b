"""Each wire format is defined once; these check that both ends of it agree.

- The store's append row: built in Python (AppendRow), read by position in Lua (ROW_<NAME> indexes
  generated from the same definition); what Lua writes is read back by StoredEvent.
- The audit rows: built by the web side, unpacked by the sink, written by services under the same names
  as the models' fields.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from django.db import models

from events.core import positions, routing
from events.core.audit import AuditBatch, BroadcastRow, DeliveryRow, StreamRow
from events.core.envelope import Event
from events.core.records import Record, StoredEvent
from events.core.store import _APPEND_LUA, GLOBAL_FIELDS, AppendRow, EventStore
from scripts.embedded import RedisServer
from subscriptions import services
from subscriptions.models import BroadcastDelivery, DeliveryAudit, Subscription


def test_the_append_script_names_every_row_field_and_only_those() -> None:
    header = _APPEND_LUA.splitlines()[0]
    names, indexes = header.removeprefix("local ").split(" = ")
    assert names.split(", ") == [f"ROW_{field.upper()}" for field in AppendRow._fields]
    assert indexes.split(", ") == [str(i) for i in range(1, len(AppendRow._fields) + 1)]
    used = set(re.findall(r"r\[(\w+)\]", _APPEND_LUA))
    assert used == {f"ROW_{field.upper()}" for field in AppendRow._fields}
    assert not re.search(r"r\[\d+\]", _APPEND_LUA), "the script reads a row field by a bare number"
    assert set(GLOBAL_FIELDS.values()) <= set(AppendRow._fields)


@pytest.fixture
async def store(redis_server: RedisServer):
    client = aioredis.from_url(redis_server.url)
    yield EventStore(client, retention_seconds=3600)
    await client.aclose()


async def test_what_the_script_stores_reads_back_field_for_field(store: EventStore) -> None:
    event = Event("message", "Progress", "ana", "pi-1", False, '{"percent":42,"name":"ü"}', "producer-7")
    record = Record("engine", 3, 41, 1_700_000_000_123, event)
    [event_id] = await store.append([record])

    entry = await store.entry(event_id)
    assert entry is not None
    assert set(entry) == {"event_id", *GLOBAL_FIELDS}
    expected = {
        "event_id": event_id,
        "type": "message",
        "event": "Progress",
        "user": "ana",
        "processInstanceUuid": "pi-1",
        "broadcast": "false",
        "data": '{"percent":42,"name":"ü"}',
        "published_at": "1700000000123",
        "kafka_topic": "engine",
        "kafka_partition": "3",
        "kafka_offset": "41",
        "producer_id": "producer-7",
    }
    assert {k: v for k, v in entry.items() if k != "received_at"} == expected
    assert abs(int(entry["received_at"]) - time.time() * 1000) < 60_000

    place = positions.parse_redis_id(event_id)
    assert place is not None
    stored = StoredEvent(
        event_id,
        "message",
        "Progress",
        "ana",
        "pi-1",
        False,
        event.data_json,
        1_700_000_000_123,
        "engine",
        3,
        41,
        shard=0,
        place=place,
    )
    assert (await store.read_all("0-0")).events == [stored]
    # The per-source entry (packed by the client) reads back as the same event.
    source = store.keys.process_source("pi-1")
    assert source.key == routing.process_source("pi-1")
    assert await store.replay(sources=[source], after=(positions.ZERO,), until=(place,)) == [stored]
    # The record's partition offset moved in the same step.
    assert await store.stored_offsets([("engine", 3)]) == {("engine", 3): 41}


async def test_a_rejected_record_moves_only_its_offset(store: EventStore) -> None:
    assert await store.append([Record("engine", 0, 9, 1, None)]) == [""]
    assert (await store.read_all("0-0")).events == []
    assert await store.stored_offsets([("engine", 0)]) == {("engine", 0): 9}


def _field_names(model: type[models.Model]) -> set[str]:
    return {f.name for f in model._meta.concrete_fields if not (f.primary_key and f.auto_created)}


@pytest.mark.parametrize(
    ("row", "model"),
    [(StreamRow, Subscription), (DeliveryRow, DeliveryAudit), (BroadcastRow, BroadcastDelivery)],
)
def test_audit_rows_name_exactly_their_models_fields(row: Any, model: type[models.Model]) -> None:
    assert set(row._fields) == _field_names(model)


def _batch() -> AuditBatch:
    stream_id = str(uuid.uuid4())
    now = time.time()
    opened = StreamRow(stream_id, "ana", ["pi-1"], "bearer", now, "", "10.0.0.1", "ua", "web:1", None, "", "", 0)
    return AuditBatch(
        opened=[opened],
        deliveries=[
            DeliveryRow(stream_id, "1-0", "Progress", "delivered", "ana", "pi-1", "engine", 3, 41, now, 2.5),
            DeliveryRow(stream_id, "2-0", "Admin", "dropped", "ana", "", "", -1, -1, now, None),
        ],
        broadcasts=[BroadcastRow("3-0", "All", "web:1", 7, now, 1.0, "engine", 0, 5)],
        closed=[
            opened._replace(closed_at=now + 1, close_reason="client_gone", last_event_id="1-0", events_delivered=1)
        ],
    )


def test_an_audit_batch_survives_packing() -> None:
    batch = _batch()
    unpacked = AuditBatch.unpack(batch.pack())
    assert unpacked == batch
    assert isinstance(unpacked.deliveries[0], DeliveryRow)


@pytest.mark.django_db
def test_services_write_an_audit_batch_as_the_models_read_it() -> None:
    batch = _batch()
    services.streams_record(batch=AuditBatch.unpack(batch.pack()))
    stream = Subscription.objects.get(pk=batch.opened[0].id)
    assert (stream.user, stream.process_instances, stream.close_reason, stream.events_delivered) == (
        "ana",
        ["pi-1"],
        Subscription.CloseReason.CLIENT_GONE,
        1,
    )
    delivered, dropped = DeliveryAudit.objects.filter(subscription=stream).order_by("event_id")
    assert (delivered.status, delivered.kafka_offset, delivered.latency_ms) == ("delivered", 41, 2.5)
    # "-1" on the wire is "none" in the database.
    assert (dropped.status, dropped.kafka_partition, dropped.kafka_offset, dropped.latency_ms) == (
        "dropped",
        None,
        None,
        None,
    )
    assert BroadcastDelivery.objects.get(event_id="3-0").streams == 7
