"""Who receives an event, and every Redis key and channel-layer group name, built in one place only."""

from __future__ import annotations

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


def source_of(*, type: str, user: str | None, process_instance: str | None, broadcast: bool) -> str | None:
    """The one per-source stream an event is indexed in (None: only the global stream).

    A message for a user *and* a process instance lives with the process instance and is
    filtered by user when delivered; a disconnect lives there too, so open streams meet it in order.
    """
    if type == "connect":
        return None
    if process_instance is not None:
        return process_source(process_instance)
    if broadcast:
        return BROADCAST_SOURCE
    if user is not None:
        return user_source(user)
    return None


def sources_for(*, user: str, process_instances: list[str]) -> list[str]:
    """The per-source streams a stream of `user` following `process_instances` reads from."""
    return [user_source(user), BROADCAST_SOURCE, *(process_source(p) for p in process_instances)]


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
