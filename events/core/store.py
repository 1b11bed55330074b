"""The Redis event store: append a batch atomically, publish it live, replay from a position, retention.

Design (docs/event-store.md): the store has one shard on a single Redis and EVENTS_STORE_SHARDS on a Redis
Cluster (routing.Keyspace: one hash slot each). Every accepted event gets a Redis stream id `<ms>-<seq>`
from its shard's counter, so ids are totally ordered within a shard. It is written to the shard's stream of
every event (on a single Redis the contract's `events-gateway:events`) and to the one per-source stream it
belongs to (user, broadcast or process instance) under the same id, and published on that source's channel
in the same atomic step, so a web process hears exactly the sources its streams read. A stream's position
is one id per shard (events.core.positions): replay is one XRANGE per followed source after it, merged by
id, a page at a time. Kafka offsets are recorded in the same atomic step, so a record re-read after a crash
is recognised and never stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from events.core import positions
from events.core.envelope import Event
from events.core.positions import Id, Position
from events.core.records import Record, StoredEvent
from events.core.routing import Keyspace, Source

# Records per script call: one call blocks Redis while it runs, so big batches go as several calls in
# one pipeline and other clients (web processes reading) get their turn in between.
APPEND_CHUNK = 500
# Trimming is approximate (MINID ~): entries this close to the retention horizon may or may not be gone.
TRIM_MARGIN_MS = 60_000
# Events a replay reads per source per round trip, and hands out per page.
REPLAY_PAGE = 200
# Kept for callers that validate a single-Redis id: ASCII digits only (`\\d` would take other scripts' digits).
ID_PATTERN = positions.REDIS_ID

Redis = Any  # redis.asyncio.Redis or redis.asyncio.RedisCluster


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
    source_key: str  # the per-source stream, '' for none (Keyspace.source_of)
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
          redis.call(ARGV[3], skey, id .. ' ' .. r[ROW_PACKED])
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


def parse_id(event_id: str) -> Id | None:
    """(ms, seq) of a single-Redis event id."""
    return positions.parse_redis_id(event_id)


@dataclass(frozen=True, slots=True)
class ReadBatch:
    """Entries of a shard's stream of every event after a position: the events, and the ids of entries that
    could not be read as events (written by something else, or damaged), which a reader skips and reports."""

    events: list[StoredEvent]
    unreadable: list[tuple[str, str]]  # (entry id, why)
    last_id: str | None  # the last entry read, readable or not: where the next read starts
    full: bool  # as many entries as asked for: more may follow


def _text(value: bytes | str, errors: str = "strict") -> str:
    return value.decode("utf-8", errors) if isinstance(value, bytes) else value


class EventStore:
    """Appends and reads events in Redis; one instance per process, over one connection pool (a cluster
    client on a Redis Cluster)."""

    def __init__(self, client: Redis, *, retention_seconds: int, keyspace: Keyspace | None = None) -> None:
        self.redis = client
        self.retention_seconds = retention_seconds
        self.keys = keyspace or Keyspace()
        self.shards = self.keys.shards
        self._append = client.register_script(_APPEND_LUA)
        self._publish = "SPUBLISH" if self.keys.cluster else "PUBLISH"

    # --- writing --------------------------------------------------------------------------------------
    def _shard_of_event(self, event: Event) -> tuple[int, Source | None]:
        source = self.keys.source_of(
            type=event.type, user=event.user, process_instance=event.process_instance, broadcast=event.broadcast
        )
        if source is not None:
            return source.shard, source
        return self.keys.shard_of(f"u:{event.user or ''}"), None

    async def stored_offsets(self, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The last Kafka offset stored for each (topic, partition), over every shard; -1 where none is."""
        if not partitions:
            return {}
        keys = [self.keys.offset_key(k, t, p) for t, p in partitions for k in range(self.shards)]
        values = await self._get_many(keys)
        out = {}
        for i, tp in enumerate(partitions):
            found = [int(v) for v in values[i * self.shards : (i + 1) * self.shards] if v is not None]
            out[tp] = max(found, default=-1)
        return out

    async def seen_producer_ids(self, events: Sequence[Event]) -> set[str]:
        """The producer ids of `events` already stored within retention."""
        ids = [(e.producer_id, self._shard_of_event(e)[0]) for e in events if e.producer_id]
        if not ids:
            return set()
        values = await self._get_many([self.keys.dedup_key(shard, p) for p, shard in ids])
        return {p for (p, _), v in zip(ids, values, strict=True) if v is not None}

    async def producer_event_id(self, producer_id: str) -> str | None:
        """The id of the event first stored with producer id `producer_id` within retention, or None."""
        values = await self._get_many([self.keys.dedup_key(k, producer_id) for k in range(self.shards)])
        for shard, value in enumerate(values):
            if value is not None:
                return positions.event_id(shard, _text(value, "replace"), self.shards)
        return None

    async def _get_many(self, keys: list[str]) -> list[Any]:
        if not self.keys.cluster:
            return list(await self.redis.mget(keys))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            return list(await pipe.execute())

    async def append(self, records: Sequence[Record]) -> list[str]:
        """Store a batch; for each record its new event id, '' if its offset was stored before or it was
        rejected, 'dup' if its producer id was seen within retention."""
        received_ms = str(int(time.time() * 1000))
        by_shard: dict[int, list[tuple[int, AppendRow]]] = {}
        for index, record in enumerate(records):
            ev = record.event
            topic, partition, offset = record.topic, str(record.partition), str(record.offset)
            tracked = record.partition >= 0  # records from Kafka; admin grant changes have no offset
            if ev is None:
                shard = record.partition % self.shards if tracked else 0
                offset_key = self.keys.offset_key(shard, record.topic, record.partition) if tracked else ""
                row = AppendRow(topic, partition, offset, *_REJECTED, offset_key, b"")
            else:
                shard, source = self._shard_of_event(ev)
                offset_key = self.keys.offset_key(shard, record.topic, record.partition) if tracked else ""
                row = AppendRow(
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
                    source_key=source.key if source is not None else "",
                    dedup_key=self.keys.dedup_key(shard, ev.producer_id) if ev.producer_id else "",
                    offset_key=offset_key,
                    packed=StoredEvent.pack(ev, record),
                )
            by_shard.setdefault(shard, []).append((index, row))
        calls: list[tuple[int, list[int], list[Any]]] = []
        for shard, rows in by_shard.items():
            for i in range(0, len(rows), APPEND_CHUNK):
                chunk = rows[i : i + APPEND_CHUNK]
                packed = msgpack.packb([row for _, row in chunk], use_bin_type=False)
                calls.append((shard, [index for index, _ in chunk], [self.retention_seconds, packed, self._publish]))
        if len(calls) == 1:
            shard, _, args = calls[0]
            results = [await self._append(keys=self._append_keys(shard), args=args)]
        elif not self.keys.cluster:
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, _, args in calls:
                    await self._append(keys=self._append_keys(shard), args=args, client=pipe)
                results = await pipe.execute()
        else:
            # A cluster pipeline cannot carry scripts: shards in parallel, each shard's chunks in order.
            results = [None] * len(calls)

            async def run_shard(shard: int) -> None:
                for i, (call_shard, _, args) in enumerate(calls):
                    if call_shard == shard:
                        results[i] = await self._append(keys=self._append_keys(shard), args=args)

            await asyncio.gather(*(run_shard(shard) for shard in by_shard))
        out = [""] * len(records)
        for (shard, indexes, _), result in zip(calls, results, strict=True):
            for index, value in zip(indexes, result, strict=True):
                text = _text(value)
                out[index] = positions.event_id(shard, text, self.shards) if text not in ("", "dup") else text
        return out

    def _append_keys(self, shard: int) -> list[str]:
        return [self.keys.events_stream(shard), self.keys.last_id_key(shard)]

    # --- positions ----------------------------------------------------------------------------------
    async def heads(self) -> Position:
        """Every shard's last id: a stream at this position has been offered everything stored so far."""
        values = await self._get_many([self.keys.last_id_key(k) for k in range(self.shards)])
        return tuple((positions.parse_redis_id(_text(v)) if v is not None else None) or positions.ZERO for v in values)

    async def last_id(self) -> str:
        """The single shard's last id (0-0 on an empty store); on a cluster, the encoded heads."""
        return positions.encode(await self.heads())

    async def oldest_ms(self) -> int | None:
        """The time of the oldest event still held (None: none is)."""
        times = []
        for shard in range(self.shards):
            oldest: Any = await self.redis.xrange(self.keys.events_stream(shard), count=1)
            if oldest:
                place = positions.parse_redis_id(_text(oldest[0][0]))
                if place is not None:
                    times.append(place[0])
        return min(times, default=None)

    async def resume_problem(self, position: Position) -> str | None:
        """Why a stream cannot resume from `position` (None: everything after it is still held).

        `not-yet-issued`: past what this store has reached. `expired`: older than retention, and events after
        it may have been trimmed. (0, 0) is the position of a stream opened on an empty shard: resumable while
        nothing after it has been trimmed (the oldest entry held is well inside the retention window).
        """
        heads = await self.heads()
        if not positions.covers(heads, position):
            return "not-yet-issued"
        horizon_ms = (time.time() - self.retention_seconds) * 1000
        for shard, place in enumerate(position):
            if place[0] >= horizon_ms:
                continue
            oldest: Any = await self.redis.xrange(self.keys.events_stream(shard), count=1)
            if not oldest:
                continue  # nothing held: nothing after the position can be missing... unless trimmed away
            first = positions.parse_redis_id(_text(oldest[0][0])) or positions.ZERO
            if first <= place:
                continue  # trimming removes a prefix: nothing after the position is gone
            if first[0] > horizon_ms + TRIM_MARGIN_MS and place == positions.ZERO:
                continue
            return "expired"
        return None

    # --- reading ------------------------------------------------------------------------------------
    async def entry(self, event_id: str) -> dict[str, str] | None:
        """The shard stream's entry for `event_id`, field by field (GLOBAL_FIELDS and `event_id`), as
        text; None once retention dropped it, or for an id this store did not issue."""
        parsed = positions.parse_event_id(event_id, self.shards)
        if parsed is None:
            return None
        shard, place = parsed
        rid = positions.redis_id(place)
        found: Any = await self.redis.xrange(self.keys.events_stream(shard), min=rid, max=rid, count=1)
        if not found:
            return None
        return {_text(k, "replace"): _text(v, "replace") for k, v in (found[0][1] or {}).items()}

    async def read_all(self, after: str, count: int = 1000, *, shard: int = 0) -> ReadBatch:
        """Up to `count` entries of every source of `shard` after `after`, oldest first."""
        raw: Any = await self.redis.xrange(self.keys.events_stream(shard), min=f"({after}", count=count)
        events: list[StoredEvent] = []
        unreadable: list[tuple[str, str]] = []
        last_id = None
        for raw_id, fields in raw:
            last_id = _text(raw_id, "replace")
            try:
                decoded = {_text(k): _text(v) for k, v in fields.items()}
                events.append(StoredEvent.from_fields(last_id, decoded, shard=shard, shards=self.shards))
            except (KeyError, ValueError, TypeError) as exc:
                unreadable.append((last_id, f"{type(exc).__name__}: {exc}"[:200]))
        return ReadBatch(events, unreadable, last_id, len(raw) >= count)

    def decode_live(self, source: Source, message: bytes) -> StoredEvent | None:
        """An event published on a source's channel (`<id> <packed>`); None if it cannot be read."""
        rid, _, packed = message.partition(b" ")
        try:
            return StoredEvent.from_packed(rid.decode("ascii"), packed, shard=source.shard, shards=self.shards)
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException):
            return None

    async def replay(self, *, sources: Sequence[Source], after: Position, until: Position) -> list[StoredEvent]:
        """Every event in `sources` after `after` up to `until` (shard by shard), in id order, in one list.
        For tools and tests; streams use replay_pages."""
        out: list[StoredEvent] = []
        async for page in self.replay_pages(sources=sources, after=after, until=until):
            out += page
        return out

    async def replay_pages(
        self, *, sources: Sequence[Source], after: Position, until: Position, page: int = REPLAY_PAGE
    ) -> AsyncIterator[list[StoredEvent]]:
        """The events in `sources` after `after` up to `until`, in id order, a page at a time: memory stays
        at about one page per source whatever the length of the replay."""
        replay = _Replay(self, sources, after, until, page)
        while page_out := await replay.next_page():
            yield page_out


class _Replay:
    """A merge by id of several per-source streams, read a page per source at a time."""

    def __init__(self, store: EventStore, sources: Sequence[Source], after: Position, until: Position, page: int):
        self.store = store
        self.until = until
        self.page = page
        self.cursors = {s: after[s.shard] for s in sources if until[s.shard] > after[s.shard]}
        self.buffers: dict[Source, deque[StoredEvent]] = {s: deque() for s in self.cursors}
        self.open = set(self.cursors)  # sources that may hold more than their buffer

    async def next_page(self) -> list[StoredEvent]:
        while refill := [s for s in self.open if not self.buffers[s]]:
            await self._fill(refill)
        out: list[StoredEvent] = []
        heap = [(b[0].place, b[0].shard, i, s) for i, (s, b) in enumerate(self.buffers.items()) if b]
        heapq.heapify(heap)
        while heap and len(out) < self.page:
            _, _, i, source = heapq.heappop(heap)
            buffer = self.buffers[source]
            out.append(buffer.popleft())
            if buffer:
                heapq.heappush(heap, (buffer[0].place, buffer[0].shard, i, source))
            elif source in self.open:
                break  # its next page may hold the next event in order: read it first
        return out

    async def _fill(self, sources: list[Source]) -> None:
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for source in sources:
                pipe.xrange(
                    source.key,
                    min=f"({positions.redis_id(self.cursors[source])}",
                    max=positions.redis_id(self.until[source.shard]),
                    count=self.page,
                )
            results = await pipe.execute()
        shards = self.store.shards
        for source, found in zip(sources, results, strict=True):
            entries = found or []
            if len(entries) < self.page:
                self.open.discard(source)
            for entry_id, fields in entries:
                rid = _text(entry_id)
                self.cursors[source] = positions.parse_redis_id(rid) or self.cursors[source]
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    event = StoredEvent.from_packed(rid, fields[b"e"], shard=source.shard, shards=shards)
                    self.buffers[source].append(event)
