"""A reconnect storm, shared by tests/test_connect_storm.py and bench/workloads/e_reconnect_storm.py.

Streams are opened on one web process of a two-process deployment, half of their users on session cookies
and half on bearer tokens. Events flow (each user's own and broadcasts, numbered in their data); the web
process is killed (SIGKILL); every stream reconnects to the other web process within a second, as a
browser's EventSource does, with `Last-Event-ID`. Events keep flowing before, during and after the storm.
The result says, per stream, what it missed or got twice, every status its reconnects got, and how many
database queries the surviving process made while the streams came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tests.harness import Gateway, http_get, token, wait_until
from tests.sse_client import open_stream

EVENT = "StormEvent"
JITTER_SECONDS = 1.0  # streams reconnect within this after their server is gone
OPEN_CONCURRENCY = 50
TOKEN_TTL = 3 * 3600


@dataclass
class Follower:
    """One stream as a browser keeps it: reconnecting with the last id it saw when the server drops it."""

    user: str
    headers: dict[str, str]
    urls: list[str]
    received: list[int] = field(default_factory=list)  # event numbers, in arrival order
    ids: list[str] = field(default_factory=list)  # the ids of those events
    statuses: list[int] = field(default_factory=list)  # of every (re)connect
    errors: list[str] = field(default_factory=list)
    last_event_id: str | None = None
    reconnected_at: float | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Keep the stream open until cancelled: on each drop, wait up to JITTER_SECONDS, then reconnect to
        the next address that answers."""
        turn = 0
        while True:
            url = self.urls[turn % len(self.urls)]
            headers = dict(self.headers)
            if self.last_event_id is not None:
                headers["Last-Event-ID"] = self.last_event_id
            try:
                conn = await open_stream(url, headers=headers)
            except OSError as exc:  # a killed process: the next address
                self.errors.append(f"{url}: {exc!r}")
                turn += 1
                await asyncio.sleep(random.uniform(0, JITTER_SECONDS / 4))
                continue
            self.statuses.append(conn.status)
            try:
                if conn.status != 200 or not conn.headers.get("content-type", "").startswith("text/event-stream"):
                    self.errors.append(f"{url}: HTTP {conn.status} {conn.body[:200]!r}")
                else:
                    await self._read(conn, again=len(self.statuses) > 1)
            finally:
                await conn.close()
            turn += 1
            await asyncio.sleep(random.uniform(0, JITTER_SECONDS))

    async def _read(self, conn: Any, *, again: bool) -> None:
        while (block := await conn.next_block()) is not None:
            if block.get("id") is not None:
                self.last_event_id = block.get("id")
                self.opened.set()
                if again and self.reconnected_at is None:
                    self.reconnected_at = time.monotonic()
            if block.get("event") == EVENT:
                self.received.append(json.loads(block.get("data") or "{}")["data"]["n"])
                self.ids.append(block.get("id") or "")


@dataclass
class Plan:
    """Who streams and what is sent: `streams` streams over `users` users (half on sessions), and per
    batch one event per user plus `broadcasts` broadcasts."""

    streams: int
    users: int
    broadcasts: int = 3
    prefix: str = "storm"

    def user(self, i: int) -> str:
        return f"{self.prefix}-u{i:04d}"

    def on_session(self, i: int) -> bool:
        return i % 2 == 0


class Storm:
    def __init__(self, gateway: Gateway, plan: Plan, sessions: dict[str, str]) -> None:
        """`sessions`: session key by user, for the users the plan puts on sessions."""
        assert len(gateway.webs) >= 2, "a storm needs a second web process to reconnect to"
        self.gateway = gateway
        self.plan = plan
        self.victim, self.survivor = gateway.webs[0], gateway.webs[1]
        self.followers: list[Follower] = []
        for s in range(plan.streams):
            i = s % plan.users
            user = plan.user(i)
            if plan.on_session(i):
                headers = {"Cookie": f"sessionid={sessions[user]}"}
            else:
                headers = {"Authorization": f"Bearer {token(user, ttl=TOKEN_TTL)}"}
            self.followers.append(Follower(user, headers, [self.victim.url, self.survivor.url]))
        self.sent: list[tuple[int, str | None]] = []  # (number, user or None for a broadcast)
        self.killed_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, timeout: float = 120) -> float:
        """Open every stream on the victim; the seconds it took."""
        started = time.monotonic()
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def start(follower: Follower) -> None:
            async with gate:
                self._tasks.append(asyncio.get_running_loop().create_task(follower.run()))
                await follower.opened.wait()

        async with asyncio.timeout(timeout):
            await asyncio.gather(*(start(f) for f in self.followers))
        return time.monotonic() - started

    async def send_batch(self) -> None:
        """One event for each user and the plan's broadcasts, numbered on from the last batch."""
        producer = await self.gateway.producer()
        futures = []
        for i in range(self.plan.users + self.plan.broadcasts):
            n = len(self.sent)
            user = self.plan.user(i) if i < self.plan.users else None
            envelope: dict[str, Any] = {"type": "message", "event": EVENT, "data": {"n": n}}
            if user:
                envelope["user"] = user
            else:
                envelope["broadcast"] = True
            value = json.dumps(envelope).encode()
            futures.append(await producer.send(self.gateway.topic, value, key=(user or "broadcast").encode()))
            self.sent.append((n, user))
        await asyncio.gather(*futures)

    def expected(self, follower: Follower) -> list[int]:
        return [n for n, user in self.sent if user is None or user == follower.user]

    async def delivered(self, timeout: float) -> None:
        """Wait until every stream has at least what it should have (it is checked exactly afterwards)."""

        def done() -> bool:
            return all(len(f.received) >= len(self.expected(f)) for f in self.followers)

        await wait_until(done, timeout=timeout, interval=0.2, what="every stream to have its events")

    async def kill_victim(self) -> None:
        self.killed_at = time.monotonic()
        self.victim.proc.signal(signal.SIGKILL)
        await self.victim.proc.exited(30)

    async def reconnected(self, timeout: float) -> float:
        """Wait until every stream is back (a position or event from the survivor); seconds since the kill."""
        await wait_until(
            lambda: all(f.reconnected_at is not None for f in self.followers),
            timeout=timeout,
            interval=0.1,
            what="every stream to reconnect",
        )
        assert self.killed_at is not None
        return max(f.reconnected_at or 0.0 for f in self.followers) - self.killed_at

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def outcome(self) -> dict[str, Any]:
        """Per-stream exactness and the statuses every connect got."""
        missing = duplicated = unordered = 0
        inexact: list[str] = []
        for follower in self.followers:
            counts = Counter(follower.received)
            lost = set(self.expected(follower)) - set(counts)
            twice = sum(c - 1 for c in counts.values() if c > 1)
            extra = set(counts) - set(self.expected(follower))
            keys = [_id_key(i) for i in follower.ids]
            ordered = all(a < b for a, b in itertools.pairwise(keys)) if all(keys) else True
            missing += len(lost)
            duplicated += twice
            unordered += 0 if ordered else 1
            if lost or twice or extra or not ordered:
                inexact.append(f"{follower.user}: missing {sorted(lost)[:5]}, twice {twice}, extra {sorted(extra)[:5]}")
        statuses = Counter(s for f in self.followers for s in f.statuses)
        again = [f"{f.user}: {f.statuses} {f.errors[:3]}" for f in self.followers if len(f.statuses) > 2]
        reconnect_s = [f.reconnected_at - self.killed_at for f in self.followers if f.reconnected_at and self.killed_at]
        return {
            "streams": len(self.followers),
            "users": self.plan.users,
            "session_streams": sum(1 for f in self.followers if "Cookie" in f.headers),
            "events_sent": len(self.sent),
            "deliveries_expected": sum(len(self.expected(f)) for f in self.followers),
            "deliveries_received": sum(len(f.received) for f in self.followers),
            "missing": missing,
            "duplicated": duplicated,
            "out_of_order_streams": unordered,
            "inexact_streams": inexact[:10],
            "inexact_count": len(inexact),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "connected_more_than_twice": again[:10],
            "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "reconnected": len(reconnect_s),
            "reconnect_s_max": round(max(reconnect_s), 2) if reconnect_s else None,
        }


def _id_key(event_id: str) -> tuple[int, ...]:
    """Ids are opaque to clients; the gateway's are `<ms>-<seq>` today, which gives their order."""
    parts = event_id.split("-")
    return tuple(int(p) for p in parts) if len(parts) == 2 and all(p.isdigit() for p in parts) else ()


async def database_queries(url: str) -> float:
    """The web process's gateway_database_queries_total."""
    _, body = await http_get(url + "/metrics", timeout=10)
    for line in body.splitlines():
        if line.startswith("gateway_database_queries_total "):
            return float(line.split()[1])
    raise AssertionError(f"{url}/metrics has no gateway_database_queries_total")


async def run_storm(
    gateway: Gateway,
    plan: Plan,
    sessions: dict[str, str],
    *,
    timeout: float = 120,
    during: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """The whole storm: open, a batch, kill, a batch during the reconnects, a batch after; the outcome with
    the survivor's database queries while the streams came back."""
    storm = Storm(gateway, plan, sessions)
    try:
        out: dict[str, Any] = {"open_s": round(await storm.open(timeout), 2)}
        await storm.send_batch()
        await storm.delivered(timeout)
        queries_before = await database_queries(storm.survivor.url)
        await storm.kill_victim()
        await storm.send_batch()  # while the streams are away or coming back
        if during is not None:
            await during()
        out["reconnect_s"] = round(await storm.reconnected(timeout), 2)
        out["survivor_queries"] = await database_queries(storm.survivor.url) - queries_before
        await storm.send_batch()
        with contextlib.suppress(AssertionError):  # whatever is still missing is reported, not waited for
            await storm.delivered(timeout)
        out.update(storm.outcome())
        out["queries_per_reconnect"] = round(out["survivor_queries"] / max(1, out["reconnected"]), 3)
        return out
    finally:
        await storm.close()
