"""Appends events straight to the event store of the source tree it runs in: the store-to-socket benchmarks'
producer (bench/scaleout.py), with no Kafka hop.

Run by bench/trees.py as `<tree's python> <this file>` with the tree as working directory and PYTHONPATH, in
that tree's gateway environment, so that events are stored in that tree's format: its
`events.core.store.EventStore.append(list[events.core.records.Record])`, each record's event made by its
`events.core.envelope.parse`. After each append it announces as that tree's consumer does
(`IngestService._announce(ids)`, when the tree has one; see `Announcer`).

A record's `timestamp_ms` (the event's `publishedAt`) is taken just before the append call that stores it,
so a client's receipt time minus `publishedAt` is store-to-socket latency including the append's own round
trip; each job reports the append calls' durations too.

Protocol with the parent: one JSON command per line on stdin, one JSON reply per line on stdout, matched by
`id` (commands run concurrently):
    {"id": n, "cmd": "append", "count": N, "rate": R, "tick": s, "batch": B,
     "users": [...] | "broadcast": true, "payload_bytes": n}
        N events, R/s (0: as fast as possible), what is due appended every `tick` seconds in calls of at
        most B records; round-robin over `users`, or broadcasts; `payload_bytes` pads each event's data;
        with "job": name, `stop` ends it early; with "track_ids": true, the reply's `returned` maps each stored
        id to the time (epoch s) its append call returned
    {"id": n, "cmd": "stop", "job": name}
    {"id": n, "cmd": "quit"}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from typing import Any

# This file lives in another checkout's bench/: the tree in the working directory is the code measured.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.getcwd()] + [p for p in sys.path if p and os.path.abspath(p) not in (_HERE, os.getcwd())]

import django  # noqa: E402

django.setup()

import redis.asyncio as aioredis  # noqa: E402
from django.conf import settings  # noqa: E402

import events  # noqa: E402
from events.core.envelope import parse  # noqa: E402
from events.core.records import Record  # noqa: E402
from events.core.store import EventStore  # noqa: E402

CODE = os.path.dirname(os.path.dirname(os.path.abspath(events.__file__ or "")))  # the tree measured
TOPIC = "bench-store"  # a record's topic: these events come from no Kafka partition (partition -1)
MAX_BYTES = 1 << 30
BASE_DATA = {"progressUpdateDTO": {"currentNodeId": "node-1", "status": "RUNNING", "percent": 42}}


class Announcer:
    """Tells web processes that events are durable, the way the tree's consumer does after a batch.

    Uses `events.ingest.service.IngestService._announce(ids)` on a service whose `redis` and `store` are the
    appender's, when the tree has that method; otherwise nothing (the tree's store or web processes must
    notice appends by themselves, which `describe` reports).
    """

    def __init__(self, client: aioredis.Redis, store: EventStore) -> None:
        self._announce: Any = None
        self.describe = "none"
        try:
            from events.ingest.service import IngestService  # noqa: PLC0415 - optional in another tree
        except ImportError:
            return
        if not hasattr(IngestService, "_announce"):
            return
        service = IngestService(topics=[TOPIC], group_id="bench-appender")
        service.redis, service.store = client, store
        self._announce = getattr(service, "_announce")  # noqa: B009 - what the consumer calls after a batch, in trees that have it
        self.describe = "IngestService._announce"

    async def __call__(self, ids: list[str]) -> None:
        if self._announce is not None:
            await self._announce([i for i in ids if i and i != "dup"])


class Appender:
    def __init__(self) -> None:
        self.redis = aioredis.from_url(settings.REDIS_URL, socket_timeout=60)
        self.store = EventStore(self.redis, retention_seconds=settings.EVENTS_RETENTION_SECONDS)
        self.announce = Announcer(self.redis, self.store)
        self.offset = 0
        self.stopping: set[str] = set()

    def events(self, cmd: dict[str, Any]) -> list[Any]:
        """One event per target (user or broadcast), parsed by the tree's envelope code; reused for each record."""
        data: dict[str, Any] = dict(BASE_DATA)
        if cmd.get("payload_bytes"):
            data["blob"] = "x" * int(cmd["payload_bytes"])
        if cmd.get("broadcast"):
            envelopes = [{"type": "message", "event": "BenchBroadcast", "broadcast": True, "data": data}]
        else:
            envelopes = [{"type": "message", "event": "BenchUser", "user": u, "data": data} for u in cmd["users"]]
        return [parse(json.dumps(e).encode(), max_bytes=MAX_BYTES) for e in envelopes]

    async def append(self, cmd: dict[str, Any]) -> dict[str, Any]:
        events = self.events(cmd)
        count, rate = int(cmd["count"]), float(cmd.get("rate") or 0)
        tick, batch = float(cmd.get("tick") or 0.005), int(cmd.get("batch") or 5000)
        durations: list[float] = []
        returned: dict[str, float] | None = {} if cmd.get("track_ids") else None
        first_id = last_id = ""
        cpu0, started = sum(os.times()[:2]), time.monotonic()
        sent = 0
        job = cmd.get("job")
        while sent < count and job not in self.stopping:
            due = count if rate <= 0 else min(count, int((time.monotonic() - started) * rate) + 1)
            while sent < due:
                size = min(batch, due - sent)
                now_ms = int(time.time() * 1000)
                records = [
                    Record(
                        topic=TOPIC,
                        partition=-1,
                        offset=self.offset + i,
                        timestamp_ms=now_ms,
                        event=events[(sent + i) % len(events)],
                    )
                    for i in range(size)
                ]
                t0 = time.perf_counter()
                ids = await self.store.append(records)
                durations.append(time.perf_counter() - t0)
                await self.announce(ids)
                stored = [i for i in ids if i and i != "dup"]
                if returned is not None:
                    now = time.time()
                    returned.update(dict.fromkeys(stored, now))
                if stored:
                    first_id = first_id or stored[0]
                    last_id = stored[-1]
                self.offset += size
                sent += size
            if sent < count:
                await asyncio.sleep(tick)
        self.stopping.discard(job or "")
        seconds = time.monotonic() - started
        durations.sort()
        return {
            "appended": sent,
            "calls": len(durations),
            "seconds": round(seconds, 3),
            "rate_achieved": round(sent / seconds, 1) if seconds > 0 else None,
            "first_id": first_id,
            "last_id": last_id,
            "append_ms": {
                "p50": round(1000 * durations[len(durations) // 2], 2) if durations else None,
                "p99": round(1000 * durations[int(len(durations) * 0.99)], 2) if durations else None,
                "max": round(1000 * durations[-1], 2) if durations else None,
            },
            "cpu_s": round(sum(os.times()[:2]) - cpu0, 3),
            "announce": self.announce.describe,
            **({"returned": returned} if returned is not None else {}),
        }

    async def close(self) -> None:
        await self.redis.aclose()


async def serve() -> None:
    """Answer the parent's commands, each in a task of its own, until `quit` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    appender = Appender()
    tasks: set[asyncio.Task[None]] = set()

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def run(cmd: dict[str, Any]) -> None:
        try:
            reply({"id": cmd["id"], **await appender.append(cmd)})
        except Exception:
            reply({"id": cmd["id"], "error": traceback.format_exc()})

    reply({"id": 0, "ready": True, "announce": appender.announce.describe, "code": CODE})
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "stop":
                appender.stopping.add(cmd["job"])
                reply({"id": cmd["id"]})
                continue
            if cmd["cmd"] != "append":
                reply({"id": cmd["id"], "error": f"unknown command {cmd['cmd']}"})
                continue
            task = loop.create_task(run(cmd))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await appender.close()


if __name__ == "__main__":
    asyncio.run(serve())
