"""(b) Every open stream on one broadcast at `rate` events/s: deliveries/s achieved, latency, loss."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.profiling import Profiler
from bench.support import PAYLOAD, Bench, System, cpu_text, log, percentile


async def run(bench: Bench, system: System, rate: int, *, profile: Path | None = None) -> dict[str, Any]:
    """Broadcast at `rate` to every open stream; with `profile`, py-spy records the web process meanwhile."""
    s = bench.scale
    total = int(rate * s.b_seconds)

    def make(i: int) -> tuple[bytes, bytes]:
        value = {"type": "message", "event": "BenchBroadcast", "broadcast": True, "data": {"seq": i, **PAYLOAD}}
        return b"broadcast", json.dumps(value).encode()

    await bench.clients.stats(reset=True)
    streams = (await bench.clients.stats())["open"]
    expected = total * streams
    mark = await bench.store_mark(system)
    spy = Profiler(system.web.pid, profile) if profile else None
    meter = bench.meter(system)
    meter.start()
    started = time.time()
    produce_s = await bench.produce(system.topic, total=total, rate=rate, make=make)
    stats = await bench.drain(expected)
    cpu = meter.percent()
    summary = await spy.stop() if spy is not None else None
    # Deliveries over the time they took: at least the production window, longer if the gateway lagged.
    span = max(produce_s, (stats["last_receipt"] or time.time()) - started)
    out = {
        "streams": streams,
        "events": total,
        "rate": rate,
        "offered_deliveries_per_s": rate * streams,
        "produce_s": round(produce_s, 2),
        "expected": expected,
        "received": stats["events"],
        "lost": expected - stats["events"],
        "deliveries_per_s": round(stats["events"] / span),
        "drain_after_produce_s": round(span - produce_s, 2),
        "p50_ms": percentile(stats["hist"], 0.50),
        "p99_ms": percentile(stats["hist"], 0.99),
        "max_ms": percentile(stats["hist"], 1.0),
        "server_closed": stats["server_closed"],
        "cpu_percent": cpu,
        "store_leg": await bench.store_leg(system, mark),
    }
    if summary is not None:
        out["profile"] = summary
    log(
        f"  (b{rate}) {system.name}: {streams} streams x {rate}/s for {s.b_seconds:.0f}s: "
        f"{out['deliveries_per_s']} deliveries/s of {rate * streams} offered, p50 {out['p50_ms']} ms, "
        f"p99 {out['p99_ms']} ms, lost {out['lost']}/{expected}, server-closed streams {out['server_closed']}; "
        f"CPU% {cpu_text(cpu)}"
    )
    return out
