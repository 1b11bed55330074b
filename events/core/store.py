"""The Redis event store: append a batch atomically, replay from an id, retention.

Design (docs/event-store.md): every accepted event gets a Redis stream id `<ms>-<seq>` from one counter,
so ids are totally ordered across all sources. It is written to the global stream `events-gateway:events`
and to the one per-source stream it belongs to (user, broadcast or process instance) under the same id.
A stream's single Last-Event-ID is therefore a position in every source at once: replay is one XRANGE per
followed source after that id, merged by id. Kafka offsets are recorded in the same atomic script, so a
record re-read after a crash is recognised and never stored twice.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import redis.asyncio as aioredis

from events.core import routing
from events.core.records import Record, StoredEvent

# Records per script call: one call blocks Redis while it runs, so big batches go as several calls in
# one pipeline and other clients (web processes reading) get their turn in between.
APPEND_CHUNK = 500
# Trimming is approximate (MINID ~): entries this close to the retention horizon may or may not be gone.
TRIM_MARGIN_MS = 60_000
# ASCII digits only: `\\d` would also take other scripts' digits, which int() reads but Redis refuses.
ID_PATTERN = re.compile(r"^([0-9]{1,15})-([0-9]{1,15})\Z")


class AppendRow(NamedTuple):
    """One record as the append script takes it; the script names each field `ROW_<NAME>` (see _ROW_INDEXES)."""

    topic: str
    partition: str
    offset: str
    producer_id: str  # '' when the producer gave none
    type: str  # '' for a rejected record: only its partition's stored offset moves
    event: str
    user: str
    process_instance: str
    broadcast: str  # 'true' or 'false'
    data: str
    published_at: str  # the Kafka record's timestamp, epoch ms
    received_at: str  # when the batch reached the store, epoch ms
    source_key: str  # the per-source stream, '' for none (routing.source_of)
    dedup_key: str  # '' when there is no producer id
    offset_key: str  # '' for events that do not come from Kafka
    packed: bytes  # the per-source entry (StoredEvent.pack)


# The global stream's entry: field name -> the AppendRow field it holds (StoredEvent.from_fields reads it).
GLOBAL_FIELDS = {
    "type": "type",
    "event": "event",
    "user": "user",
    "processInstanceUuid": "process_instance",
    "broadcast": "broadcast",
    "data": "data",
    "published_at": "published_at",
    "kafka_topic": "topic",
    "kafka_partition": "partition",
    "kafka_offset": "offset",
    "received_at": "received_at",
    "producer_id": "producer_id",
}
# Lua names AppendRow's fields by position: `local ROW_TOPIC, ROW_PARTITION, ... = 1, 2, ...`.
_ROW_INDEXES = (
    "local "
    + ", ".join(f"ROW_{name.upper()}" for name in AppendRow._fields)
    + " = "
    + ", ".join(str(i) for i in range(1, len(AppendRow._fields) + 1))
)
_GLOBAL_ENTRY = ", ".join(f"'{field}', r[ROW_{row.upper()}]" for field, row in GLOBAL_FIELDS.items())

# One call appends a chunk of records; Redis runs it atomically, so an event is either fully stored
# (global stream, source stream, dedup key, partition offset) or not at all. ARGV[2] is the chunk as
# one MessagePack array of AppendRows: packing one blob is far cheaper than 16 arguments a record.
# Per-source entries hold one field, the event packed by the client (see StoredEvent.pack): Redis
# spends its time per field, and only this code reads them.
_APPEND_LUA = (
    _ROW_INDEXES
    + """
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
for _, r in ipairs(cmsgpack.unpack(ARGV[2])) do
  local okey = r[ROW_OFFSET_KEY]
  local offset = tonumber(r[ROW_OFFSET])
  local stored = -1
  if okey ~= '' then
    stored = offsets[okey]
    if stored == nil then stored = tonumber(redis.call('GET', okey) or '-1') end
  end
  if okey ~= '' and offset <= stored then
    results[#results + 1] = ''
  else
    if okey ~= '' then offsets[okey] = offset end
    if r[ROW_TYPE] == '' then
      results[#results + 1] = ''
    else
      local ms, seq = now_ms, 0
      if ms <= last_ms then ms = last_ms; seq = last_seq + 1 end
      local id = string.format('%.0f', ms) .. '-' .. string.format('%.0f', seq)
      local dkey = r[ROW_DEDUP_KEY]
      if dkey ~= '' and not redis.call('SET', dkey, id, 'NX', 'EX', retention) then
        results[#results + 1] = 'dup'
      else
        last_ms, last_seq = ms, seq
        redis.call('XADD', KEYS[1], 'MINID', '~', minid, id, 'event_id', id, """
    + _GLOBAL_ENTRY
    + """)
        local skey = r[ROW_SOURCE_KEY]
        if skey ~= '' then
          redis.call('XADD', skey, 'MINID', '~', minid, id, 'e', r[ROW_PACKED])
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
)
# A rejected record: producer_id .. dedup_key empty, so only its partition's stored offset moves.
_REJECTED = ("",) * 11


def parse_id(event_id: str) -> tuple[int, int] | None:
    match = ID_PATTERN.match(event_id)
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True, slots=True)
class ReadBatch:
    """Entries of the global stream after a position: the events, and the ids of entries that could not be
    read as events (written by something else, or damaged), which a reader skips and reports."""

    events: list[StoredEvent]
    unreadable: list[tuple[str, str]]  # (entry id, why)
    last_id: str | None  # the last entry read, readable or not: where the next read starts
    full: bool  # as many entries as asked for: more may follow


def _read_batch(raw: Any, count: int) -> ReadBatch:
    events: list[StoredEvent] = []
    unreadable: list[tuple[str, str]] = []
    last_id = None
    for raw_id, fields in raw:
        last_id = _text(raw_id, "replace")
        try:
            events.append(StoredEvent.from_fields(last_id, {_text(k): _text(v) for k, v in fields.items()}))
        except (KeyError, ValueError, TypeError) as exc:
            unreadable.append((last_id, f"{type(exc).__name__}: {exc}"[:200]))
    return ReadBatch(events, unreadable, last_id, len(raw) >= count)


def _source_entries(raw: Any) -> list[StoredEvent]:
    """Per-source stream entries: one packed field `e` each; an unreadable one is skipped (the global
    stream's reader reports it)."""
    events = []
    for entry_id, fields in raw:
        with contextlib.suppress(KeyError, ValueError, TypeError):
            events.append(StoredEvent.from_packed(_text(entry_id), fields[b"e"]))
    return events


def _text(value: bytes | str, errors: str = "strict") -> str:
    return value.decode("utf-8", errors) if isinstance(value, bytes) else value


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

    async def seen_producer_ids(self, producer_ids: Sequence[str]) -> set[str]:
        """The producer ids among `producer_ids` already stored within retention."""
        if not producer_ids:
            return set()
        values = await self.redis.mget([routing.dedup_key(p) for p in producer_ids])
        return {p for p, v in zip(producer_ids, values, strict=True) if v is not None}

    async def append(self, records: Sequence[Record]) -> list[str]:
        """Store a batch; for each record its new id, '' if its offset was stored before or it was
        rejected, 'dup' if its producer id was seen within retention."""
        received_ms = str(int(time.time() * 1000))
        rows: list[AppendRow] = []
        for record in records:
            ev = record.event
            topic, partition, offset = record.topic, str(record.partition), str(record.offset)
            offset_key = routing.offset_key(record.topic, record.partition) if record.partition >= 0 else ""
            if ev is None:
                rows.append(AppendRow(topic, partition, offset, *_REJECTED, offset_key, b""))
                continue
            source = routing.source_of(
                type=ev.type, user=ev.user, process_instance=ev.process_instance, broadcast=ev.broadcast
            )
            rows.append(
                AppendRow(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    producer_id=ev.producer_id or "",
                    type=ev.type,
                    event=ev.event,
                    user=ev.user or "",
                    process_instance=ev.process_instance or "",
                    broadcast="true" if ev.broadcast else "false",
                    data=ev.data_json,
                    published_at=str(record.timestamp_ms),
                    received_at=received_ms,
                    source_key=source or "",
                    dedup_key=routing.dedup_key(ev.producer_id) if ev.producer_id else "",
                    offset_key=offset_key,
                    packed=StoredEvent.pack(ev, record),
                )
            )
        chunks = [
            [self.retention_seconds, msgpack.packb(rows[i : i + APPEND_CHUNK], use_bin_type=False)]
            for i in range(0, len(rows), APPEND_CHUNK)
        ]
        keys = [routing.EVENTS_STREAM, routing.LAST_ID_KEY]
        if len(chunks) == 1:
            results = [await self._append(keys=keys, args=chunks[0])]
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for chunk in chunks:
                    await self._append(keys=keys, args=chunk, client=pipe)
                results = await pipe.execute()
        return [_text(r) for result in results for r in result]

    async def last_id(self) -> str:
        value = await self.redis.get(routing.LAST_ID_KEY)
        return _text(value) if value is not None else "0-0"

    async def entry(self, event_id: str) -> dict[str, str] | None:
        """The global stream's entry for `event_id`, field by field (GLOBAL_FIELDS and `event_id`), as
        text; None once retention dropped it."""
        if parse_id(event_id) is None:
            return None
        found: Any = await self.redis.xrange(routing.EVENTS_STREAM, min=event_id, max=event_id, count=1)
        if not found:
            return None
        return {_text(k, "replace"): _text(v, "replace") for k, v in (found[0][1] or {}).items()}

    async def read_all(self, after: str, count: int = 1000) -> ReadBatch:
        """Up to `count` entries of every source after `after`, oldest first (what web processes fan out)."""
        return _read_batch(await self.redis.xrange(routing.EVENTS_STREAM, min=f"({after}", count=count), count)

    async def is_resumable(self, event_id: str) -> bool:
        """Whether everything after position `event_id` is still held: a position this store has reached
        (not past its last id) and not older than retention (trimming only removes older entries).

        `0-0` is the position of a stream opened on an empty store: resumable while nothing has been
        trimmed yet (the oldest entry is well inside the retention window).
        """
        parsed = parse_id(event_id)
        last = parse_id(await self.last_id())
        if parsed is None or last is None or parsed > last:
            return False
        horizon_ms = (time.time() - self.retention_seconds) * 1000
        if parsed == (0, 0):
            oldest: Any = await self.redis.xrange(routing.EVENTS_STREAM, count=1)
            return not oldest or (parse_id(_text(oldest[0][0])) or (0, 0))[0] > horizon_ms + TRIM_MARGIN_MS
        return parsed[0] >= horizon_ms

    async def replay(self, *, sources: Sequence[str], after: str, until: str) -> list[StoredEvent]:
        """Events in `sources` with after < id <= until, in id order; cost follows what is returned."""
        if parse_id(until) is not None and parse_id(after) is not None and parse_id(until) <= parse_id(after):  # type: ignore[operator]
            return []
        events: list[StoredEvent] = []
        for source in sources:
            start = f"({after}"
            while True:
                batch: list[Any] = await self.redis.xrange(source, min=start, max=until, count=1000) or []
                events += _source_entries(batch)
                if len(batch) < 1000:
                    break
                start = f"({_text(batch[-1][0])}"
        events.sort(key=lambda e: parse_id(e.id) or (0, 0))
        return events
