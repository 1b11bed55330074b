"""The Redis event store: append a batch atomically, replay from an id, retention.

Design (docs/event-store.md): every accepted event gets a Redis stream id `<ms>-<seq>` from one counter,
so ids are totally ordered across all sources. It is written to the global stream `events-gateway:events`
and to the one per-source stream it belongs to (user, broadcast or process instance) under the same id.
A stream's single Last-Event-ID is therefore a position in every source at once: replay is one XRANGE per
followed source after that id, merged by id. Kafka offsets are recorded in the same atomic script, so a
record re-read after a crash is recognised and never stored twice.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from events import routing
from events.envelope import Event

ID_PATTERN = re.compile(r"^(\d{1,15})-(\d{1,15})$")

# One call appends a whole batch; Redis runs it atomically, so an event is either fully stored
# (global stream, source stream, dedup key, partition offset) or not at all.
_APPEND_LUA = """
local STRIDE = 15
local retention = tonumber(ARGV[1])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = string.format('%.0f', now_ms - retention * 1000)
local last = redis.call('GET', KEYS[2])
local last_ms, last_seq = -1, -1
if last then
  local dash = string.find(last, '-', 1, true)
  last_ms = tonumber(string.sub(last, 1, dash - 1))
  last_seq = tonumber(string.sub(last, dash + 1))
end
local results = {}
local offsets = {}
for i = 2, #ARGV, STRIDE do
  local okey = ARGV[i + 14]
  local offset = tonumber(ARGV[i + 2])
  local stored = -1
  if okey ~= '' then
    stored = offsets[okey]
    if stored == nil then stored = tonumber(redis.call('GET', okey) or '-1') end
  end
  if okey ~= '' and offset <= stored then
    results[#results + 1] = ''
  else
    if okey ~= '' then offsets[okey] = offset end
    local kind = ARGV[i + 4]
    if kind == '' then
      results[#results + 1] = ''
    else
      local ms, seq = now_ms, 0
      if ms <= last_ms then ms = last_ms; seq = last_seq + 1 end
      local id = string.format('%.0f', ms) .. '-' .. string.format('%.0f', seq)
      local dkey = ARGV[i + 13]
      if dkey ~= '' and not redis.call('SET', dkey, id, 'NX', 'EX', retention) then
        results[#results + 1] = 'dup'
      else
        last_ms, last_seq = ms, seq
        redis.call('XADD', KEYS[1], 'MINID', '~', minid, id,
          'event_id', id, 'type', kind, 'event', ARGV[i + 5], 'user', ARGV[i + 6],
          'processInstanceUuid', ARGV[i + 7], 'broadcast', ARGV[i + 8], 'data', ARGV[i + 9],
          'published_at', ARGV[i + 10], 'kafka_topic', ARGV[i], 'kafka_partition', ARGV[i + 1],
          'kafka_offset', ARGV[i + 2], 'received_at', ARGV[i + 11], 'producer_id', ARGV[i + 3])
        local skey = ARGV[i + 12]
        if skey ~= '' then
          redis.call('XADD', skey, 'MINID', '~', minid, id,
            'event_id', id, 'type', kind, 'event', ARGV[i + 5], 'user', ARGV[i + 6],
            'processInstanceUuid', ARGV[i + 7], 'broadcast', ARGV[i + 8], 'data', ARGV[i + 9],
            'published_at', ARGV[i + 10], 'kafka_topic', ARGV[i], 'kafka_partition', ARGV[i + 1],
            'kafka_offset', ARGV[i + 2])
          redis.call('EXPIRE', skey, retention + 60)
        end
        results[#results + 1] = id
      end
    end
  end
end
for okey, offset in pairs(offsets) do redis.call('SET', okey, string.format('%.0f', offset)) end
if last_ms >= 0 then
  redis.call('SET', KEYS[2], string.format('%.0f', last_ms) .. '-' .. string.format('%.0f', last_seq))
end
return results
"""


def parse_id(event_id: str) -> tuple[int, int] | None:
    match = ID_PATTERN.match(event_id)
    return (int(match[1]), int(match[2])) if match else None


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

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[str, str]) -> StoredEvent:
        return cls(
            id=entry_id,
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
        )


def _entries(raw: Any) -> list[StoredEvent]:
    return [
        StoredEvent.from_fields(_text(entry_id), {_text(k): _text(v) for k, v in fields.items()})
        for entry_id, fields in raw
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class EventStore:
    """Appends and reads events in Redis; one instance per process, over one connection pool."""

    def __init__(self, client: aioredis.Redis, *, retention_seconds: int) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds
        self._append = client.register_script(_APPEND_LUA)

    async def stored_offsets(self, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The last Kafka offset stored for each (topic, partition); -1 where none is."""
        if not partitions:
            return {}
        values = await self.redis.mget([routing.offset_key(t, p) for t, p in partitions])
        return {tp: int(v) if v is not None else -1 for tp, v in zip(partitions, values, strict=True)}

    async def append(self, records: Sequence[Record]) -> list[str]:
        """Store a batch; for each record its new id, '' if its offset was stored before or it was
        rejected, 'dup' if its producer id was seen within retention."""
        received_ms = str(int(time.time() * 1000))
        args: list[str | int] = [self.retention_seconds]
        for record in records:
            ev = record.event
            args += [record.topic, record.partition, record.offset]
            if ev is None:
                args += [""] * 11
            else:
                source = routing.source_of(
                    type=ev.type, user=ev.user, process_instance=ev.process_instance, broadcast=ev.broadcast
                )
                args += [
                    ev.producer_id or "",
                    ev.type,
                    ev.event,
                    ev.user or "",
                    ev.process_instance or "",
                    "true" if ev.broadcast else "false",
                    ev.data_json,
                    record.timestamp_ms,
                    received_ms,
                    source or "",
                    routing.dedup_key(ev.producer_id) if ev.producer_id else "",
                ]
            args.append(routing.offset_key(record.topic, record.partition) if record.partition >= 0 else "")
        result = await self._append(keys=[routing.EVENTS_STREAM, routing.LAST_ID_KEY], args=args)
        return [_text(r) for r in result]

    async def last_id(self) -> str:
        value = await self.redis.get(routing.LAST_ID_KEY)
        return _text(value) if value is not None else "0-0"

    async def read_all(self, after: str, count: int = 1000) -> list[StoredEvent]:
        """Events of every source after `after`, oldest first (what web processes fan out)."""
        return _entries(await self.redis.xrange(routing.EVENTS_STREAM, min=f"({after}", count=count))

    async def is_resumable(self, event_id: str) -> bool:
        """Whether `event_id` is an id this store issued and still holds."""
        parsed = parse_id(event_id)
        if parsed is None or parsed[0] < (time.time() - self.retention_seconds) * 1000:
            return False
        return bool(await self.redis.xrange(routing.EVENTS_STREAM, min=event_id, max=event_id, count=1))

    async def replay(self, *, sources: Sequence[str], after: str, until: str) -> list[StoredEvent]:
        """Events in `sources` with after < id <= until, in id order; cost follows what is returned."""
        if parse_id(until) is not None and parse_id(after) is not None and parse_id(until) <= parse_id(after):  # type: ignore[operator]
            return []
        events: list[StoredEvent] = []
        for source in sources:
            start = f"({after}"
            while True:
                batch: list[Any] = await self.redis.xrange(source, min=start, max=until, count=1000) or []
                events += _entries(batch)
                if len(batch) < 1000:
                    break
                start = f"({_text(batch[-1][0])}"
        events.sort(key=lambda e: parse_id(e.id) or (0, 0))
        return events
