"""Ingest benchmark: events/s from Kafka to durable-in-Redis for one `run_consumer` process, next to the
raw ceiling on the same machine in the same run (plain aiokafka consume of the same records plus a
pipelined Redis write of the same bytes, committing per batch).

    .venv/bin/python -m bench.ingest [--events 200000] [--partitions 4]

Prints the figures; the last line is one JSON object (also written to bench/results/ingest.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from events.core import routing
from scripts.embedded import KafkaBroker, RedisServer
from tests.harness import Gateway, Layout, wait_until

ROOT = Path(__file__).resolve().parent.parent
# The consumer on debug settings (no secret to supply), logging warnings only.
SETTINGS = {"DJANGO_DEBUG": "true", "DJANGO_SECRET_KEY": "bench", "LOG_LEVEL": "WARNING"}


def envelope(n: int, rng: random.Random) -> tuple[bytes, bytes]:
    """A realistic mix: user notifications, process-instance updates (some for one user), broadcasts."""
    process = f"3f1c{rng.randrange(2000):04d}-8f2a-4c1e-9d7b-2a6e5c4b{n % 97:04d}"
    kind = n % 10
    value: dict[str, Any]
    if kind < 5:
        value = {
            "event": "ProcessMetadata",
            "processInstanceUuid": process,
            "data": {"progressUpdateDTO": {"currentNodeId": f"node-{n % 37}", "tokenUuid": f"t-{n}"}},
        }
        key = process
    elif kind < 8:
        user = f"user-{rng.randrange(5000)}"
        value = {"event": "Notification", "user": user, "data": {"title": "Task assigned", "taskId": n}}
        key = user
    elif kind < 9:
        value = {
            "event": "Data",
            "processInstanceUuid": process,
            "user": f"user-{n % 5000}",
            "data": {"screen": "s1", "values": {"amount": n, "currency": "EUR"}},
        }
        key = process
    else:
        value = {"event": "Announcement", "broadcast": True, "data": {"text": "maintenance at 22:00"}}
        key = "broadcast"
    return key.encode(), json.dumps(value).encode()


async def produce(bootstrap: str, topic: str, count: int) -> float:
    rng = random.Random(1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for n in range(count):
            key, value = envelope(n, rng)
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count / (time.perf_counter() - started)


async def raw_ceiling(bootstrap: str, topic: str, redis_url: str, count: int) -> dict[str, float]:
    """Plain aiokafka consumer + one pipelined XADD per record of the same bytes, commit per batch."""
    client = aioredis.from_url(redis_url)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="raw-ceiling",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    seen, first, last = 0, 0.0, 0.0
    cpu_before = time.process_time()
    try:
        while seen < count:
            batch = await consumer.getmany(timeout_ms=500, max_records=1000)
            if not batch:
                continue
            async with client.pipeline(transaction=False) as pipe:
                for records in batch.values():
                    for record in records:
                        pipe.xadd("raw-ceiling", {"v": record.value, "k": record.key or b""})
                await pipe.execute()
            await consumer.commit()
            if not first:
                first = time.perf_counter()
            seen += sum(len(r) for r in batch.values())
            last = time.perf_counter()
    finally:
        await consumer.stop()
        await client.aclose()
    return {"events_per_s": (count - 1) / (last - first), "cpu_s": time.process_time() - cpu_before}


async def gateway_consumer(gateway: Gateway, count: int) -> dict[str, float]:
    """One `manage.py run_consumer` process; rate from the first to the last event made durable."""
    await gateway.manage("migrate", "-v", "0")
    proc = await gateway.start_consumer(wait=False)
    client = aioredis.from_url(gateway.env["REDIS_URL"], decode_responses=True)
    try:
        ps = psutil.Process(proc.pid)

        async def stored() -> bool:
            return await client.xlen(routing.EVENTS_STREAM) >= count

        await wait_until(stored, timeout=600, interval=0.2, what=f"{count} events stored", watch=[proc])
        cpu = ps.cpu_times()
        head: Any = await client.xrange(routing.EVENTS_STREAM, count=1)
        tail: Any = await client.xrevrange(routing.EVENTS_STREAM, count=1)
        first, last = head[0][1], tail[0][1]
        seconds = (int(last["received_at"]) - int(first["received_at"])) / 1000
        return {
            "events_per_s": (count - 1) / seconds,
            "cpu_s": cpu.user + cpu.system,
            "rss_mb": ps.memory_info().rss / 1e6,
        }
    finally:
        await gateway.stop()
        await client.aclose()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with KafkaBroker() as broker, RedisServer() as redis_server, tempfile.TemporaryDirectory() as tmp:
        gateway = Gateway(
            bootstrap=broker.bootstrap,
            redis_url=redis_server.url,
            database_url=f"sqlite:///{tmp}/db.sqlite3",
            layout=Layout(webs=0, consumers=0, partitions=args.partitions),
            settings=SETTINGS,
            name="bench-ingest",
        )
        await gateway.create_topics()
        produced = await produce(broker.bootstrap, gateway.topic, args.events)
        print(f"produced {args.events} records at {produced:,.0f}/s", flush=True)
        ceiling = await raw_ceiling(broker.bootstrap, gateway.topic, redis_server.url, args.events)
        print(f"raw ceiling (aiokafka + pipelined XADD): {ceiling['events_per_s']:,.0f} events/s", flush=True)
        ours = await gateway_consumer(gateway, args.events)
        print(
            f"run_consumer: {ours['events_per_s']:,.0f} events/s, {ours['cpu_s']:.1f} s CPU, "
            f"{ours['rss_mb']:.0f} MB RSS",
            flush=True,
        )
    return {
        "events": args.events,
        "partitions": args.partitions,
        "events_per_s": round(ours["events_per_s"]),
        "ceiling_events_per_s": round(ceiling["events_per_s"]),
        "fraction_of_ceiling": round(ours["events_per_s"] / ceiling["events_per_s"], 3),
        "consumer_cpu_s": round(ours["cpu_s"], 2),
        "consumer_rss_mb": round(ours["rss_mb"]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    result = asyncio.run(main(parser.parse_args()))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
