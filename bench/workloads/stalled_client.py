"""One stalled client (it stops reading its socket) while `scale.stall_mb` MB of broadcasts are offered in
batches smaller than the stream buffer (EVENTS_STREAM_BUFFER, 1,000 events by default), beside a client that
reads at full speed: the web process's peak RSS growth, whether the stalled client is closed, and whether the
reading one gets everything.

The stalled client's kernel socket buffers (and the server's) take some MB before the web process's own
buffers start to fill; that part is not in the web process's RSS. After the broadcasts, the stalled client
reads again: a connection the server ended shows as closed, with what got through before.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.support import log
from bench.trees import CpuWindow, RssWatch, Run, Tree, Webs, from_return, latency

STALLED_USER, READER_USER = 2, 3
SETTLE_SECONDS = 1.0
# After the last broadcast, the server gets this long to notice the stalled client before memory is read.
NOTICE_SECONDS = 3.0


async def run(bench: Run, tree: Tree, scale: Any) -> dict[str, Any]:
    event_bytes = scale.event_kb * 1024
    count = max(1, int(scale.stall_mb * 2**20 / event_bytes))
    batch = scale.stall_batch
    async with Webs(bench, tree, "stalled-client") as webs:
        web, port = await webs.add_web()
        await webs.probe.open("stalled", port, STALLED_USER)
        await webs.probe.open("reader", port, READER_USER, track_ids=True)
        await webs.probe.call("pause", name="stalled")
        await asyncio.sleep(SETTLE_SECONDS)
        rss = RssWatch(web.pid).start()
        cpu = CpuWindow({"web": web.pid}).start()
        started = time.time()
        appended = await webs.append(
            count=count,
            rate=batch / scale.stall_interval,
            tick=scale.stall_interval,
            batch=batch,
            broadcast=True,
            payload_bytes=event_bytes,
            track_ids=True,
        )
        reader = await webs.probe.call("wait", name="reader", events=count, timeout=300, idle=15)
        returned, receipts = appended.pop("returned"), reader.pop("receipts")
        await asyncio.sleep(NOTICE_SECONDS)
        memory = rss.stop()
        web_cpu = cpu.lap()
        before_resume = await webs.probe.call("stats", name="stalled")
        await webs.probe.call("resume", name="stalled")
        stalled = await webs.probe.call("wait", name="stalled", events=count, timeout=120, idle=5)
    result = {
        "offered_mb": round(count * event_bytes / 2**20, 1),
        "events": count,
        "event_kb": scale.event_kb,
        "batch": batch,
        "batch_interval_s": scale.stall_interval,
        "append": appended,
        "memory": memory,
        "cpu": web_cpu,
        "stalled": {
            "server_closed": stalled["server_closed"],
            "close_error": stalled["close_error"],
            "received": stalled["events"],
            "received_before_resuming": before_resume["events"],
            "controls": stalled["controls"],
        },
        "reader": {
            "received": reader["events"],
            "lost": count - reader["events"],
            "server_closed": reader["server_closed"],
            "all_in_s": round(reader["last_receipt"] - started, 3) if reader["last_receipt"] else None,
            "latency_from_return": from_return(returned, receipts),
            "latency_from_published": latency(reader["hist"]),
        },
    }
    s = result["stalled"]
    log(
        f"  [{tree.name}] stalled client, {result['offered_mb']} MB of broadcasts ({count} x {scale.event_kb} KB "
        f"in batches of {batch} every {scale.stall_interval} s): web peak RSS +{memory['peak_growth_mb']} MB; "
        f"stalled client {'CLOSED by the server' if s['server_closed'] else 'not closed'} "
        f"({s['received']}/{count} events reached it); reading client {result['reader']['received']}/{count}, "
        f"latency from the append's return p50 {result['reader']['latency_from_return']['p50_ms']} "
        f"max {result['reader']['latency_from_return']['max_ms']} ms"
    )
    return result
