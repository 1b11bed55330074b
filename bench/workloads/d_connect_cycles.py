"""(d) Connect/disconnect cycles: the web process's asyncio tasks, open streams and RSS before and after."""

from __future__ import annotations

import time
from typing import Any

from bench.support import Bench, System, log, metric_values, user_token

CONCURRENCY = 10  # cycles in flight at a time


async def run(bench: Bench, system: System) -> dict[str, Any]:
    """The gateway only (it reads the web process's metrics); on a fresh process, before (c)."""
    s = bench.scale
    tokens = [user_token(i) for i in range(min(s.streams, s.idle_users))]
    # A short warm-up so allocator pools and caches reach their working size before the baseline.
    await bench.clients.cycle(system.port, system.path, tokens, max(10, s.cycles // 10), CONCURRENCY)
    await bench.settled(system)
    before = await metric_values(system.url)
    rss_before = system.rss()
    cycled = await bench.clients.cycle(system.port, system.path, tokens, s.cycles, CONCURRENCY)
    started = time.monotonic()
    await bench.settled(system, tasks_at_most=before.get("gateway_asyncio_tasks"))
    cleanup_s = time.monotonic() - started
    after = await metric_values(system.url)
    rss_after = system.rss()
    out = {
        "cycles": s.cycles,
        "failed": cycled["failed"],
        "seconds": round(cycled["seconds"], 2),
        "tasks_before": before.get("gateway_asyncio_tasks"),
        "tasks_after": after.get("gateway_asyncio_tasks"),
        "open_streams_after": after.get("gateway_open_streams"),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_delta_kb": round((rss_after - rss_before) / 1024),
        "settle_s": round(cleanup_s, 2),
    }
    log(
        f"  (d) {system.name}: {s.cycles} connect/disconnect cycles in {out['seconds']} s "
        f"({cycled['failed']} failed): "
        f"tasks {out['tasks_before']:.0f} -> {out['tasks_after']:.0f}, RSS {out['rss_before_mb']} -> "
        f"{out['rss_after_mb']} MB ({out['rss_delta_kb']:+} KB), open streams after {out['open_streams_after']:.0f}"
    )
    return out
