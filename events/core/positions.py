"""Positions in the store, and the opaque SSE ids that carry them.

The store is split into shards (one on a single Redis, several on a Redis Cluster: one hash slot each).
Every shard numbers its events with Redis stream ids `<ms>-<seq>` from one counter, so ids are totally
ordered within a shard. A stream's position is one id per shard: every event it may see up to those ids
has been written to it. On a single Redis that is one id, and the SSE id is the event id itself, as it
always was; on a cluster it is a vector, written compactly (base 36) and still URL-safe:

    single shard:   1732950000000-3
    16 shards:      v1_lp0ab3k0.0_lp0ab3k2.5_...      (one `<ms>.<seq>` per shard, in shard order)

An event's own id (audits, the admin, tools) is `<ms>-<seq>` on a single Redis and `<shard>.<ms>-<seq>`
on a cluster.
"""

from __future__ import annotations

import re

Id = tuple[int, int]  # (ms, seq) of a Redis stream id
Position = tuple[Id, ...]  # one Id per shard

ZERO: Id = (0, 0)
MAX_SEQ = 2**64 - 1
_MAX_PART = 10**15  # ids carry at most 15 digits a part, as the store's ID_PATTERN allows
REDIS_ID = re.compile(r"([0-9]{1,15})-([0-9]{1,20})\Z")
_EVENT_ID = re.compile(r"(?:([0-9]{1,4})\.)?([0-9]{1,15})-([0-9]{1,20})\Z")
_VECTOR_ENTRY = re.compile(r"([0-9a-z]{1,11})\.([0-9a-z]{1,13})\Z")
VECTOR_PREFIX = "v1_"


def parse_redis_id(text: str) -> Id | None:
    match = REDIS_ID.match(text)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    return (ms, seq) if seq <= MAX_SEQ else None


def redis_id(value: Id) -> str:
    return f"{value[0]}-{value[1]}"


def event_id(shard: int, value: str, shards: int) -> str:
    """An event's id as the world sees it (audits, the admin): the Redis id, qualified by its shard on a
    cluster."""
    return value if shards == 1 else f"{shard}.{value}"


def parse_event_id(text: str, shards: int) -> tuple[int, Id] | None:
    """(shard, id) of an event id issued by a store of `shards` shards; None if it is not one."""
    match = _EVENT_ID.match(text)
    if match is None:
        return None
    shard = int(match[1]) if match[1] is not None else None
    if (shard is None) != (shards == 1) or (shard is not None and shard >= shards):
        return None
    seq = int(match[3])
    return (shard or 0, (int(match[2]), seq)) if seq <= MAX_SEQ else None


def _b36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    if number == 0:
        return "0"
    out = []
    while number:
        number, rest = divmod(number, 36)
        out.append(digits[rest])
    return "".join(reversed(out))


def encode(position: Position) -> str:
    """The SSE id of a position (opaque to clients; under 1 KB for up to 64 shards)."""
    if len(position) == 1:
        return redis_id(position[0])
    return VECTOR_PREFIX + "_".join(f"{_b36(ms)}.{_b36(seq)}" for ms, seq in position)


def decode(text: str, shards: int) -> Position | None:
    """The position an SSE id names, for a store of `shards` shards; None if it is not one this store
    issued (malformed, or written for another shard count)."""
    if shards == 1:
        value = parse_redis_id(text)
        return (value,) if value is not None and value[0] < _MAX_PART else None
    if not text.startswith(VECTOR_PREFIX):
        return None
    entries = text[len(VECTOR_PREFIX) :].split("_")
    if len(entries) != shards:
        return None
    position = []
    for entry in entries:
        match = _VECTOR_ENTRY.match(entry)
        if match is None:
            return None
        ms, seq = int(match[1], 36), int(match[2], 36)
        if ms >= _MAX_PART or seq > MAX_SEQ:
            return None
        position.append((ms, seq))
    return tuple(position)


def at_time(ms: int, shards: int) -> Position:
    """The position just before anything stored at or after `ms` (resume by time)."""
    before: Id = (ms - 1, MAX_SEQ) if ms > 0 else ZERO
    return (before,) * shards


def later(a: Position, b: Position) -> Position:
    """Shard by shard, the later of two positions."""
    return tuple(max(x, y) for x, y in zip(a, b, strict=True))


def covers(a: Position, b: Position) -> bool:
    """Whether `a` is at or past `b` on every shard."""
    return all(x >= y for x, y in zip(a, b, strict=True))
