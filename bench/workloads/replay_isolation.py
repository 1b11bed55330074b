"""A long replay beside a live stream: one client resumes across `scale.replay_events` events of its user while
another user's stream receives `scale.live_rate` events/s; the live stream's store-to-socket latency before
and during the replay, the replay's duration and the web process's peak RSS growth.

Both streams are on one web process, started after the replayed events were stored (the replaying client comes
back to another web process), so that it spends nothing on reading them live beforehand.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.support import log, user_name
from bench.trees import CpuWindow, RssWatch, Run, Tree, Webs, from_return, latency, quiet
from bench.workloads.resume_memory import position

REPLAY_USER, LIVE_USER = 5, 6
# The live stream's latency is read over this long before the replay starts.
BEFORE_SECONDS = 3.0
# The live stream is watched this long after the replay finished, in the "during" window.
AFTER_SECONDS = 1.0
FILL_BATCH = 5000


async def run(bench: Run, tree: Tree, scale: Any) -> dict[str, Any]:
    count = scale.replay_events
    async with Webs(bench, tree, "replay") as webs:
        _, first_port = await webs.add_web()
        last_event_id = await position(webs, "before", first_port, REPLAY_USER)
        await webs.remove_web(first_port)
        fill = await webs.append(count=count, rate=0, batch=FILL_BATCH, users=[user_name(REPLAY_USER)])
        web, port = await webs.add_web()
        await webs.probe.open("live", port, LIVE_USER, track_ids=True)
        await quiet(web.pid)
        live = asyncio.get_running_loop().create_task(
            webs.append(
                count=10**9,
                rate=scale.live_rate,
                tick=0.005,
                users=[user_name(LIVE_USER)],
                job="live",
                track_ids=True,
            )
        )
        try:
            await webs.probe.call("stats", name="live", reset=True)
            await asyncio.sleep(BEFORE_SECONDS)
            before = await webs.probe.call("stats", name="live", reset=True)
            rss = RssWatch(web.pid).start()
            cpu = CpuWindow({"web": web.pid}).start()
            started = time.time()
            opened = await webs.probe.open("replay", port, REPLAY_USER, last_event_id=last_event_id)
            got = await webs.probe.call("wait", name="replay", events=count, timeout=600, idle=20)
            await asyncio.sleep(AFTER_SECONDS)
            during = await webs.probe.call("stats", name="live", reset=True)
            memory = rss.stop()
            web_cpu = cpu.lap()
        finally:
            await webs.appender.call("stop", job="live")
            live_job = await live
    returned = live_job.pop("returned")
    result = {
        "events": count,
        "fill": fill,
        "replay": {
            "head_s": opened["seconds"],
            "received": got["events"],
            "complete": got["events"] == count,
            "server_closed": got["server_closed"],
            "controls": got["controls"],
            "all_in_s": round(got["last_receipt"] - started, 3) if got["last_receipt"] else None,
            "mb": round(got["bytes"] / 2**20, 1),
        },
        "live_rate": scale.live_rate,
        # Store-to-socket: from the append call's return to the client's receipt, by event id.
        "live_before": from_return(returned, before["receipts"]),
        "live_during": from_return(returned, during["receipts"]),
        # The same from `publishedAt`, taken just before the append call (so it includes the call).
        "live_before_from_published": latency(before["hist"]),
        "live_during_from_published": latency(during["hist"]),
        "live_append": live_job,
        "memory": memory,
        "cpu": web_cpu,
    }
    r, d, b = result["replay"], result["live_during"], result["live_before"]
    log(
        f"  [{tree.name}] replay of {count} events for one stream: head after {r['head_s']} s, "
        f"{r['received']}/{count} after {r['all_in_s']} s{', CLOSED by the server' if r['server_closed'] else ''}; "
        f"another stream at {scale.live_rate}/s: p50/p99/max {d['p50_ms']}/{d['p99_ms']}/{d['max_ms']} ms during "
        f"(before: {b['p50_ms']}/{b['p99_ms']}/{b['max_ms']} ms); web peak RSS +{memory['peak_growth_mb']} MB"
    )
    return result
