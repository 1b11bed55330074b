"""Who receives an event, and every Redis key and channel-layer group name, built in one place only."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

PREFIX = "events-gateway"
EVENTS_STREAM = f"{PREFIX}:events"  # the contract's stream of every accepted event
LAST_ID_KEY = f"{PREFIX}:last-id"
BROADCAST_SOURCE = f"{PREFIX}:src:b"
# Channel-layer group every web process joins to hear that new events are durable.
ANNOUNCE_GROUP = "events-gateway.announce"
TICKET_PREFIX = f"{PREFIX}:ticket:"
AUDIT_STREAM = f"{PREFIX}:audit"  # stream audit batches from web processes, written by consumers
STREAMS_OF_USER_PREFIX = f"{PREFIX}:open:"


def user_source(user: str) -> str:
    return f"{PREFIX}:src:u:{user}"


def process_source(process_instance: str) -> str:
    return f"{PREFIX}:src:p:{process_instance}"


def stream_expiry_key(stream_id: str) -> str:
    """The end (epoch seconds) of a bearer stream, moved later by token renewals from any web process."""
    return f"{PREFIX}:stream-exp:{stream_id}"


def dedup_key(producer_id: str) -> str:
    return f"{PREFIX}:dedup:{producer_id}"


def offset_key(topic: str, partition: int) -> str:
    return f"{PREFIX}:kafka:{topic}:{partition}"


@dataclass(frozen=True)
class Keyspace:
    """Where a store of `shards` shards keeps its keys. On a single Redis (one shard, `cluster` false) they
    are the names above, the contract's `events-gateway:events` among them. On a Redis Cluster every key of
    shard k carries the hash tag `{events-gateway:k}`, so each atomic step (one shard's append script, with
    its per-source streams, dedup keys, offsets and live channels) touches one hash slot."""

    shards: int = 1
    cluster: bool = False

    def _tag(self, shard: int) -> str:
        return f"{{{PREFIX}:{shard}}}" if self.cluster else PREFIX

    def events_stream(self, shard: int) -> str:
        """Every event of the shard (on a single Redis: the contract's stream of every accepted event)."""
        return f"{self._tag(shard)}:events" if self.cluster else EVENTS_STREAM

    def last_id_key(self, shard: int) -> str:
        return f"{self._tag(shard)}:last-id" if self.cluster else LAST_ID_KEY

    def shard_of(self, name: str) -> int:
        """The shard of a source (or of a key an event without a source is filed under)."""
        return zlib.crc32(name.encode("utf-8", "surrogatepass")) % self.shards if self.shards > 1 else 0

    def source(self, kind: str, name: str) -> Source:
        """A per-source stream: kind `u` (a user), `p` (a process instance) or `b` (broadcasts). Its key
        is also the channel its live events are published on."""
        shard = self.shard_of(f"{kind}:{name}")
        key = f"{self._tag(shard)}:src:{kind}:{name}" if name or kind != "b" else f"{self._tag(shard)}:src:b"
        return Source(key, shard)

    def user_source(self, user: str) -> Source:
        return self.source("u", user)

    def process_source(self, process_instance: str) -> Source:
        return self.source("p", process_instance)

    def broadcast_source(self) -> Source:
        return self.source("b", "")

    def dedup_key(self, shard: int, producer_id: str) -> str:
        return f"{self._tag(shard)}:dedup:{producer_id}"

    def offset_key(self, shard: int, topic: str, partition: int) -> str:
        return f"{self._tag(shard)}:kafka:{topic}:{partition}"

    def source_of(self, *, type: str, user: str | None, process_instance: str | None, broadcast: bool) -> Source | None:
        """The one per-source stream an event is indexed in (None: only its shard's stream of every event).

        A message for a user *and* a process instance lives with the process instance and is filtered by user
        when delivered; a disconnect lives there too, so open streams meet it in order.
        """
        if type == "connect":
            return None
        if process_instance is not None:
            return self.process_source(process_instance)
        if broadcast:
            return self.broadcast_source()
        if user is not None:
            return self.user_source(user)
        return None

    def sources_for(self, *, user: str, process_instances: list[str] | set[str]) -> list[Source]:
        """The per-source streams a stream of `user` following `process_instances` reads from."""
        followed = [self.process_source(p) for p in sorted(process_instances)]
        return [self.user_source(user), self.broadcast_source(), *followed]


@dataclass(frozen=True, slots=True)
class Source:
    key: str  # the per-source stream, and the channel of its live events
    shard: int


def visible_to(
    *,
    stream_user: str,
    event_user: str | None,
    process_instance: str | None,
    broadcast: bool,
    followed: set[str] | frozenset[str],
) -> bool:
    """Whether a stream of `stream_user` following `followed` may see this event."""
    if broadcast:
        return True
    if process_instance is not None:
        return process_instance in followed and (event_user is None or event_user == stream_user)
    return event_user == stream_user
