"""Store-to-socket on one and on two web processes, beside a web process with no streams: web CPU per delivery,
the stream-less web process's CPU, and latency from the store to the client's socket.

Layouts, each at every rate of `scale.rates` (events appended straight to the store, spread over the users):
    one web    all `scale.streams` private streams (one user each) on web1; `idle` has none
    two webs   the same streams split over web1 and web2 (even users on web1, odd on web2); `idle` has none
Each web process with streams has its own SSE client worker (bench/sseclient.py), so deliveries and latency
are counted per web process. Every web process has served one stream before (its hub runs, as on a web
process whose clients have left).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.profiling import Profiler
from bench.support import RESULTS, Clients, log, percentile, user_name, user_token
from bench.systems import PATH
from bench.trees import CpuWindow, Run, Tree, Webs, cpu_text, others_seen, quiet
from tests.harness import Proc

CONNECT_CONCURRENCY = 50
# The appender's pacing: what is due goes out every 5 ms, in one store call (a busy consumer's batches).
TICK_SECONDS = 0.005
# With the streams open and nothing flowing, CPU is read over this long (heartbeats, tickers: the floor).
QUIET_SECONDS = 3.0
# After the last append, wait this long without progress before counting the rest as lost.
DRAIN_IDLE_SECONDS = 5.0
DRAIN_MAX_SECONDS = 120.0


@dataclass
class Group:
    """A web process with streams, its client worker, and the users (indexes) whose streams it holds."""

    label: str
    proc: Proc
    port: int
    clients: Clients
    users: list[int]


async def run(bench: Run, tree: Tree, scale: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"streams": scale.streams, "rates": list(scale.rates), "seconds": scale.seconds}
    async with Webs(bench, tree, "web-cpu", stream_clients=2) as webs:
        web1, port1 = await webs.add_web()
        idle, _ = await webs.add_web()
        everyone = list(range(scale.streams))
        one = [Group("web1", web1, port1, webs.clients[0], everyone)]
        out["one_web"] = await layout(webs, one, idle, scale, "one web")
        web2, port2 = await webs.add_web()
        two = [
            Group("web1", web1, port1, webs.clients[0], everyone[0::2]),
            Group("web2", web2, port2, webs.clients[1], everyone[1::2]),
        ]
        out["two_webs"] = await layout(webs, two, idle, scale, "two webs")
    return out


async def layout(webs: Webs, groups: list[Group], idle: Proc, scale: Any, title: str) -> dict[str, Any]:
    """Open the groups' streams, measure a quiet spell and then each rate, close the streams."""
    out: dict[str, Any] = {}
    for group in groups:
        tokens = [user_token(u) for u in group.users]
        opened = await group.clients.open(group.port, PATH, tokens, CONNECT_CONCURRENCY)
        if opened["failed"]:
            log(f"  ! {opened['failed']} streams failed to open on {group.label}: {opened['errors']}")
        out[f"{group.label}_streams"] = opened["opened"]
    procs = {g.label: g.proc.pid for g in groups} | {"idle": idle.pid}
    window = CpuWindow(procs).start()
    await asyncio.sleep(QUIET_SECONDS)
    out["quiet_cpu"] = window.lap()
    quiet_text = cpu_text(out["quiet_cpu"])
    log(f"  [{webs.tree.name}] {title}, {scale.streams} streams open, nothing flowing: CPU% {quiet_text}")
    for rate in scale.rates:
        tries = []
        for attempt in range(1 + webs.run.retries):
            tries.append(await measure(webs, groups, idle, rate, scale))
            for proc in [idle, *(g.proc for g in groups)]:
                await quiet(proc.pid, within=60)
            seen = webs.run.disturbed(tries[-1])
            if seen is None or attempt == webs.run.retries:
                break
            log(f"  ! other work used {seen:.0f}% of a core meanwhile: measuring {rate}/s again")
        out[str(rate)] = min(tries, key=lambda m: max(others_seen(m), default=0.0))
        out[str(rate)]["tries"] = len(tries)
    for group in groups:
        await group.clients.close_streams()
    return out


def share(count: int, users: int, index: int) -> int:
    """Events of `count`, appended round-robin over `users` users, that go to user `index`."""
    return count // users + (1 if index < count % users else 0)


async def measure(webs: Webs, groups: list[Group], idle: Proc, rate: int, scale: Any) -> dict[str, Any]:
    total = int(rate * scale.seconds)
    users = scale.streams
    machine_before = await webs.run.calm()
    for group in groups:
        await group.clients.stats(reset=True)
    procs = {g.label: g.proc.pid for g in groups} | {
        "idle": idle.pid,
        "appender": webs.appender.pid,
        "redis": webs.run.redis_pid(),
        "bench": os.getpid(),
    }
    for group in groups:
        procs[f"client-{group.label}"] = group.clients.pids[0]
    profiler = None
    if scale.profile:
        path = RESULTS / f"profile-web-cpu-{webs.tree.name}-{len(groups)}web-{rate}.txt"
        profiler = Profiler(groups[0].proc.pid, path)
    window = CpuWindow(procs).start()
    started = time.time()
    appended = await webs.append(
        count=total, rate=rate, tick=TICK_SECONDS, users=[user_name(i) for i in range(users)], job=f"rate{rate}"
    )
    during = window.lap()
    expected = {g.label: sum(share(total, users, u) for u in g.users) for g in groups}
    stats = await drain(groups, expected)
    lap = window.lap()
    profile = await profiler.stop() if profiler is not None else None
    result: dict[str, Any] = {
        "rate": rate,
        "events": total,
        "append": appended,
        "cpu_while_appending": during,
        "cpu_until_drained": lap,
        "idle_web_percent": during["idle"]["percent"],
        "machine_before": machine_before,
        "webs": {},
    }
    if profile is not None:
        result["profile"] = profile
    merged: Counter[int] = Counter()
    received = 0
    last_receipt = started
    for group in groups:
        s = stats[group.label]
        merged.update(s["hist"])
        received += s["events"]
        last_receipt = max(last_receipt, s["last_receipt"] or started)
        cpu_s = lap[group.label]["cpu_s"]
        result["webs"][group.label] = {
            "streams": len(group.users),
            "expected": expected[group.label],
            "received": s["events"],
            "lost": expected[group.label] - s["events"],
            "server_closed": s["server_closed"],
            "cpu_percent": during[group.label]["percent"],
            "cpu_s": cpu_s,
            "us_per_delivery": round(1e6 * cpu_s / s["events"], 1) if s["events"] else None,
            "p50_ms": percentile(s["hist"], 0.5),
            "p99_ms": percentile(s["hist"], 0.99),
            "max_ms": percentile(s["hist"], 1.0),
        }
    web_cpu_s = sum(lap[g.label]["cpu_s"] for g in groups)
    result.update(
        expected=sum(expected.values()),
        received=received,
        lost=sum(expected.values()) - received,
        deliveries_per_s=round(received / max(1e-9, last_receipt - started)),
        drain_after_append_s=round(max(0.0, last_receipt - started - appended["seconds"]), 2),
        us_per_delivery=round(1e6 * web_cpu_s / received, 1) if received else None,
        p50_ms=percentile(merged, 0.5),
        p99_ms=percentile(merged, 0.99),
        max_ms=percentile(merged, 1.0),
    )
    per_web = "; ".join(
        f"{label} {w['cpu_percent']:.0f}% = {w['us_per_delivery']} us/delivery, p50 {w['p50_ms']} p99 {w['p99_ms']} ms"
        for label, w in result["webs"].items()
    )
    log(
        f"  [{webs.tree.name}] {len(groups)} web(s), {users} streams, {rate}/s for {scale.seconds:.0f}s "
        f"(appended at {appended['rate_achieved']}/s): {per_web}; no-stream web {result['idle_web_percent']:.0f}%; "
        f"p50 {result['p50_ms']} p99 {result['p99_ms']} max {result['max_ms']} ms, lost {result['lost']}; "
        f"CPU% while appending {cpu_text(during)}"
    )
    return result


async def drain(groups: list[Group], expected: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Each group's client stats once every expected delivery arrived or progress stopped."""
    deadline = time.monotonic() + DRAIN_MAX_SECONDS
    last, last_change = -1, time.monotonic()
    while True:
        stats = {g.label: await g.clients.stats() for g in groups}
        got = sum(s["events"] for s in stats.values())
        if all(stats[label]["events"] >= want for label, want in expected.items()):
            return stats
        if got != last:
            last, last_change = got, time.monotonic()
        if time.monotonic() - last_change > DRAIN_IDLE_SECONDS or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.25)
