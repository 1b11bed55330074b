"""A client resuming by Last-Event-ID across `scale.resume_mb` MB of broadcasts stored while it was away: the
web process's peak RSS growth while the client catches up at full speed, and how long that takes.

The client left one web process and comes back to another, started after the broadcasts were stored (as after
a deploy), so that the memory measured is the resume's alone, not what reading the broadcasts live left behind.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.support import log, user_name
from bench.trees import CpuWindow, RssWatch, Run, Tree, Webs, quiet

USER = 4
SETTLE_SECONDS = 1.0


async def position(webs: Webs, name: str, port: int, user: int) -> str:
    """Where a client of `user` that leaves now resumes: the id of the last event it received (one event is
    stored for it, and its stream closed once that has arrived)."""
    await webs.probe.open(name, port, user)
    await webs.append(count=1, rate=0, users=[user_name(user)])
    got = await webs.probe.call("wait", name=name, events=1, timeout=30, idle=30)
    await webs.probe.call("close", name=name)
    if not got["events"] or not got["last_id"]:
        raise RuntimeError(f"stream {name} received no event to resume from")
    return str(got["last_id"])


async def run(bench: Run, tree: Tree, scale: Any) -> dict[str, Any]:
    event_bytes = scale.event_kb * 1024
    count = max(1, int(scale.resume_mb * 2**20 / event_bytes))
    async with Webs(bench, tree, "resume") as webs:
        _, first_port = await webs.add_web()
        last_event_id = await position(webs, "before", first_port, USER)
        await webs.remove_web(first_port)
        appended = await webs.append(count=count, rate=0, batch=500, broadcast=True, payload_bytes=event_bytes)
        web, port = await webs.add_web()
        await quiet(web.pid)
        await asyncio.sleep(SETTLE_SECONDS)
        rss = RssWatch(web.pid).start()
        cpu = CpuWindow({"web": web.pid}).start()
        started = time.time()
        opened = await webs.probe.open("resume", port, USER, last_event_id=last_event_id)
        got = await webs.probe.call("wait", name="resume", events=count, timeout=300, idle=15)
        memory = rss.stop()
        web_cpu = cpu.lap()
    result = {
        "replayed_mb": round(count * event_bytes / 2**20, 1),
        "events": count,
        "event_kb": scale.event_kb,
        "last_event_id": last_event_id,
        "append": appended,
        "head_s": opened["seconds"],
        "received": got["events"],
        "complete": got["events"] == count,
        "server_closed": got["server_closed"],
        "controls": got["controls"],
        "all_in_s": round(got["last_receipt"] - started, 3) if got["last_receipt"] else None,
        "memory": memory,
        "cpu": web_cpu,
    }
    log(
        f"  [{tree.name}] resume by Last-Event-ID across {result['replayed_mb']} MB of broadcasts ({count} x "
        f"{scale.event_kb} KB): web peak RSS +{memory['peak_growth_mb']} MB; {got['events']}/{count} received, "
        f"response head after {result['head_s']} s, all after {result['all_in_s']} s"
        + (", CLOSED by the server" if got["server_closed"] else "")
    )
    return result
