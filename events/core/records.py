"""The records that cross process boundaries: a Kafka record on its way in, an event as stored, and the
outcomes a stream reports (close reasons, delivery statuses, shared with the audit models' choices)."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from django.db.models import TextChoices

from events.core import positions
from events.core.envelope import Event


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record's coordinates with its validated event (None: rejected, only its offset is kept).

    Events that do not come from Kafka (grants changed in the admin) have partition -1: no offset is tracked.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    event: Event | None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An accepted event as the store holds it, with its id (events.core.positions: the Redis id, qualified
    by its shard on a cluster), its shard and its place in that shard."""

    id: str
    type: str
    event: str
    user: str | None
    process_instance: str | None
    broadcast: bool
    data_json: str
    published_ms: int
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    shard: int = 0
    place: tuple[int, int] = (0, 0)  # (ms, seq) of its Redis id in its shard

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[str, str], *, shard: int = 0, shards: int = 1) -> StoredEvent:
        """From an entry of a shard's stream of every event (field names: events.core.store.GLOBAL_FIELDS)."""
        place = positions.parse_redis_id(entry_id)
        if place is None:
            raise ValueError(f"not a stream id: {entry_id!r}")
        return cls(
            id=positions.event_id(shard, entry_id, shards),
            type=fields["type"],
            event=fields["event"],
            user=fields["user"] or None,
            process_instance=fields["processInstanceUuid"] or None,
            broadcast=fields["broadcast"] == "true",
            data_json=fields["data"],
            published_ms=int(fields["published_at"]),
            kafka_topic=fields.get("kafka_topic", ""),
            kafka_partition=int(fields.get("kafka_partition") or -1),
            kafka_offset=int(fields.get("kafka_offset") or -1),
            shard=shard,
            place=place,
        )

    @staticmethod
    def pack(event: Event, record: Record) -> bytes:
        """The compact form kept in per-source streams: this class's fields after `id`, in order;
        `from_packed` reads it back."""
        return msgpack.packb(
            [
                event.type,
                event.event,
                event.user,
                event.process_instance,
                event.broadcast,
                event.data_json,
                record.timestamp_ms,
                record.topic,
                record.partition,
                record.offset,
            ]
        )

    @classmethod
    def from_packed(cls, entry_id: str, packed: bytes, *, shard: int = 0, shards: int = 1) -> StoredEvent:
        place = positions.parse_redis_id(entry_id)
        if place is None:
            raise ValueError(f"not a stream id: {entry_id!r}")
        fields = msgpack.unpackb(packed)
        if not isinstance(fields, list) or len(fields) != 10:
            raise ValueError("not a packed event")
        return cls(positions.event_id(shard, entry_id, shards), *fields, shard, place)  # type: ignore[call-arg]


class CloseReason(TextChoices):
    """Why a stream ended: kept on the stream's audit row (Subscription.close_reason)."""

    CLIENT_GONE = "client_gone", "client disconnected"
    SLOW_CLIENT = "slow_client", "client fell too far behind"
    AUTH_EXPIRED = "auth_expired", "bearer token expired"
    SHUTDOWN = "shutdown", "server shut down"
    SERVER_ERROR = "server_error", "transient server fault"


class DeliveryStatus(TextChoices):
    """What became of one event on one stream (DeliveryAudit.status)."""

    DELIVERED = "delivered"
    REPLAYED = "replayed"
    DROPPED = "dropped"
