"""A burst for one user: N events appended at once (as a consumer does after a pause, MAX_BATCH records per
store call) while that user's one client reads at full speed. Was the client closed as too slow, or did it get
everything? One fresh web process per burst size."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.support import log, user_name
from bench.trees import CpuWindow, RssWatch, Run, Tree, Webs, from_return, latency

USER = 1
# The consumer stores what one fetch returned in one call; its MAX_BATCH.
STORE_BATCH = 5000
SETTLE_SECONDS = 1.0
WAIT_IDLE_SECONDS = 10.0


async def run(bench: Run, tree: Tree, scale: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"bursts": {}}
    for count in scale.bursts:
        async with Webs(bench, tree, f"burst{count}") as webs:
            web, port = await webs.add_web()
            await webs.probe.open("reader", port, USER, track_ids=True)
            await asyncio.sleep(SETTLE_SECONDS)
            rss = RssWatch(web.pid).start()
            cpu = CpuWindow({"web": web.pid}).start()
            started = time.time()
            appended = await webs.append(
                count=count, rate=0, batch=STORE_BATCH, users=[user_name(USER)], track_ids=True
            )
            got = await webs.probe.call("wait", name="reader", events=count, timeout=120, idle=WAIT_IDLE_SECONDS)
            returned, receipts = appended.pop("returned"), got.pop("receipts")
            result = {
                "events": count,
                "append": appended,
                "received": got["events"],
                "complete": got["events"] == count,
                "server_closed": got["server_closed"],
                "close_error": got["close_error"],
                "controls": got["controls"],
                "all_in_s": round(got["last_receipt"] - started, 3) if got["last_receipt"] else None,
                "latency_from_return": from_return(returned, receipts),
                "latency_from_published": latency(got["hist"]),
                "memory": rss.stop(),
                "cpu": cpu.lap(),
            }
        out["bursts"][str(count)] = result
        verdict = "got everything" if result["complete"] else "INCOMPLETE"
        if result["server_closed"]:
            verdict += ", closed by the server"
        log(
            f"  [{tree.name}] burst of {count} events for one user (store calls of {STORE_BATCH}): "
            f"{result['received']}/{count} received, {verdict}, last after {result['all_in_s']} s; "
            f"latency from the append's return p50 {result['latency_from_return']['p50_ms']} "
            f"max {result['latency_from_return']['max_ms']} ms; "
            f"web peak RSS +{result['memory']['peak_growth_mb']} MB"
        )
    return out
