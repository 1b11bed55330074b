"""(c) Many idle streams: web-process RSS per stream, its threads, and the time to connect them all."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.profiling import Profiler
from bench.support import RESULTS, Bench, System, cpu_text, log, metric_values

# Let the web process settle before and after connecting, so RSS reads what the streams hold.
SETTLE_BEFORE_SECONDS = 2
SETTLE_AFTER_SECONDS = 3


async def run(bench: Bench, system: System) -> dict[str, Any]:
    s = bench.scale
    await asyncio.sleep(SETTLE_BEFORE_SECONDS)
    before, threads_before = system.rss(), system.ps.num_threads()
    meter = bench.meter(system)
    spy = None
    if bench.args.profile and system.has_metrics:
        spy = Profiler(system.web.pid, RESULTS / f"profile-{system.name}-c-connect.txt")
    meter.start()
    cpu_before = system.cpu_seconds()
    opened = await bench.open_streams(system, s.idle_streams, s.idle_users)
    connect_cpu = meter.percent()
    web_cpu_s = system.cpu_seconds() - cpu_before
    profile = await spy.stop() if spy is not None else None
    await asyncio.sleep(SETTLE_AFTER_SECONDS)
    after, threads_after = system.rss(), system.ps.num_threads()
    server_open = None
    if system.has_metrics:
        server_open = (await metric_values(system.url)).get("gateway_open_streams")
    out = {
        "streams": opened["opened"],
        "failed": opened["failed"],
        "connect_s": round(opened["seconds"], 2),
        # CPU the web process spent connecting them: on this shared machine, steadier than the wall time.
        "connect_web_cpu_s": round(web_cpu_s, 2),
        "web_cpu_ms_per_connect": round(1000 * web_cpu_s / max(1, opened["opened"]), 3),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "kb_per_stream": round((after - before) / max(1, opened["opened"]) / 1024, 1),
        "threads_before": threads_before,
        "threads_after": threads_after,
        "server_open_streams": server_open,
        "connect_cpu_percent": connect_cpu,
    }
    if profile is not None:
        out["connect_profile"] = profile
    close_s = await bench.close_streams(system)
    out["close_s"] = round(close_s, 2)
    log(
        f"  (c) {system.name}: {out['streams']} idle streams connected in {out['connect_s']} s "
        f"({out['failed']} failed; web CPU {out['connect_web_cpu_s']} s = {out['web_cpu_ms_per_connect']} ms/connect), "
        f"RSS {out['rss_before_mb']} -> {out['rss_after_mb']} MB = "
        f"{out['kb_per_stream']} KB/stream, threads {threads_before} -> {threads_after}; "
        f"all closed on the server after {out['close_s']} s; "
        f"CPU% while connecting {cpu_text(connect_cpu)}"
    )
    return out
