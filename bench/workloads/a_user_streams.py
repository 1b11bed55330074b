"""(a) N open streams, each following its own user; R events/s keyed by user for S seconds: latency, loss."""

from __future__ import annotations

import json
from typing import Any

from bench.support import PAYLOAD, Bench, System, cpu_text, log, percentile, user_name


async def run(bench: Bench, system: System) -> dict[str, Any]:
    """Expects `scale.streams` streams open, one per user (bench.open_streams)."""
    s = bench.scale
    total = int(s.a_rate * s.a_seconds)
    users = [user_name(i).encode() for i in range(s.streams)]

    def make(i: int) -> tuple[bytes, bytes]:
        user = users[i % len(users)]
        value = {"type": "message", "event": "BenchUser", "user": user.decode(), "data": {"seq": i, **PAYLOAD}}
        return user, json.dumps(value).encode()

    await bench.clients.stats(reset=True)
    mark = await bench.store_mark(system)
    meter = bench.meter(system)
    meter.start()
    produce_s = await bench.produce(system.topic, total=total, rate=s.a_rate, make=make)
    stats = await bench.drain(total)
    cpu = meter.percent()
    out = {
        "streams": s.streams,
        "events": total,
        "rate": s.a_rate,
        "produce_s": round(produce_s, 2),
        "expected": total,
        "received": stats["events"],
        "lost": total - stats["events"],
        "p50_ms": percentile(stats["hist"], 0.50),
        "p99_ms": percentile(stats["hist"], 0.99),
        "p999_ms": percentile(stats["hist"], 0.999),
        "max_ms": percentile(stats["hist"], 1.0),
        "server_closed": stats["server_closed"],
        "cpu_percent": cpu,
        "store_leg": await bench.store_leg(system, mark),
    }
    log(
        f"  (a) {system.name}: {s.streams} streams, {s.a_rate}/s for {s.a_seconds:.0f}s: "
        f"p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, max {out['max_ms']} ms, lost {out['lost']}/{total}; "
        f"CPU% {cpu_text(cpu)}"
    )
    return out
