"""Feeds the peer from Kafka: each record of PEER_TOPIC becomes django_eventstream.send_event on the
channel the gateway would route it to, with publishedAt = the record's timestamp (as the gateway's data).

Environment: PEER_BOOTSTRAP, PEER_TOPIC, PEER_GROUP, plus the peer settings' PEER_REDIS_URL.
Prints "feeder ready" once it has its partitions.
"""

import asyncio
import json
import os
import signal
from datetime import UTC, datetime

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
django.setup()

from aiokafka import AIOKafkaConsumer  # noqa: E402
from channelmanager import BROADCAST, user_channel  # noqa: E402
from django_eventstream import send_event  # noqa: E402


def published_at(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def forward(value: bytes, timestamp_ms: int) -> None:
    envelope = json.loads(value)
    if envelope.get("type", "message") != "message":
        return
    broadcast = bool(envelope.get("broadcast"))
    user = envelope.get("user")
    channel = BROADCAST if broadcast else user_channel(user)
    data = {
        "data": envelope.get("data"),
        "user": user,
        "broadcast": broadcast,
        "publishedAt": published_at(timestamp_ms),
    }
    send_event(channel, envelope.get("event", "message"), json.dumps(data, separators=(",", ":")), json_encode=False)


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumer = AIOKafkaConsumer(
        os.environ["PEER_TOPIC"],
        bootstrap_servers=os.environ["PEER_BOOTSTRAP"],
        group_id=os.environ.get("PEER_GROUP", "peer-feeder"),
        auto_offset_reset="earliest",
        # bench/delivery.py --fetch-max-wait-ms sets it for both systems; otherwise aiokafka's default.
        **({"fetch_max_wait_ms": int(wait)} if (wait := os.environ.get("PEER_FETCH_MAX_WAIT_MS")) else {}),
    )
    await consumer.start()
    ready = False
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=1000)
            if not ready and consumer.assignment():
                ready = True
                print("feeder ready", flush=True)
            for records in batch.values():
                for record in records:
                    forward(record.value, record.timestamp)
    finally:
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
