"""What the delivery workloads share: the scale, the SSE client workers, CPU and latency accounting, producing
at a rate, and the run (`Bench`) every workload gets with the system it measures.

Processes, tokens, topics and waits come from the deployment harness the tests use (tests/harness.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from events.core import routing
from scripts.embedded import KafkaBroker, RedisServer
from tests.harness import Gateway, Proc, WaitTimeout, http_get, raise_open_files, start_producer, token, wait_until

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
# 10,000 streams need more descriptors than a default soft limit of 1,024 (web process and client workers).
FD_LIMIT = 65536
PARTITIONS = 4
# The producer's pacing tick: 2,000 events/s go out as ~10-event bursts, like a busy producer's batches.
TICK_SECONDS = 0.005
# After the last event is produced, wait this long without progress before counting the rest as lost.
DRAIN_IDLE_SECONDS = 5.0
DRAIN_MAX_SECONDS = 60.0
PAYLOAD = {"progressUpdateDTO": {"currentNodeId": "node-1", "status": "RUNNING", "percent": 42}}
TOKEN_TTL = 6 * 3600  # longer than any run


@dataclass(frozen=True)
class Scale:
    streams: int = 1000
    a_rate: int = 2000
    a_seconds: float = 20.0
    b_rates: tuple[int, ...] = (20, 50)
    b_seconds: float = 15.0
    idle_streams: int = 10_000
    idle_users: int = 1000
    cycles: int = 1000
    clients: int = 1
    connect_concurrency: int = 50
    storm_streams: int = 1000
    storm_users: int = 500


QUICK = Scale(
    streams=100,
    a_rate=200,
    a_seconds=5,
    b_seconds=5,
    idle_streams=500,
    idle_users=100,
    cycles=100,
    clients=1,
    storm_streams=100,
    storm_users=50,
)


def log(message: str) -> None:
    print(message, flush=True)


def user_name(i: int) -> str:
    return f"bench-u{i:05d}"


def user_token(i: int) -> str:
    return token(user_name(i), ttl=TOKEN_TTL)


def cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())


async def metric_values(url: str) -> dict[str, float]:
    """A web process's unlabelled Prometheus samples (gateway_open_streams, gateway_asyncio_tasks, ...)."""
    _, body = await http_get(url + "/metrics", timeout=10)
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if "{" not in name:
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
    return values


# --- the SSE client workers --------------------------------------------------------------------------
class Clients:
    """bench/sseclient.py worker processes; streams are spread over them round-robin."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for _ in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(BENCH / "sseclient.py"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 26,
                preexec_fn=functools.partial(raise_open_files, FD_LIMIT),
            )
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def _call(self, proc: asyncio.subprocess.Process, cmd: dict[str, Any]) -> dict[str, Any]:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await proc.stdin.drain()
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError("an SSE client worker died")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def each(self, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._call(p, c) for p, c in zip(self.procs, cmds, strict=True))))

    async def all(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.each([cmd] * self.count)

    async def open(self, port: int, path: str, tokens: list[str], concurrency: int) -> dict[str, Any]:
        started = time.monotonic()
        replies = await self.each(
            [
                {
                    "cmd": "open",
                    "host": "127.0.0.1",
                    "port": port,
                    "path": path,
                    "tokens": tokens[i :: self.count],
                    "concurrency": max(1, concurrency // self.count),
                }
                for i in range(self.count)
            ]
        )
        return {
            "opened": sum(r["opened"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "errors": [e for r in replies for e in r["errors"]][:5],
            "seconds": time.monotonic() - started,
        }

    async def cycle(self, port: int, path: str, tokens: list[str], count: int, concurrency: int) -> dict[str, Any]:
        started = time.monotonic()
        share = [count // self.count + (1 if i < count % self.count else 0) for i in range(self.count)]
        replies = await self.each(
            [
                {
                    "cmd": "cycle",
                    "host": "127.0.0.1",
                    "port": port,
                    "path": path,
                    "tokens": tokens,
                    "count": share[i],
                    "concurrency": max(1, concurrency // self.count),
                }
                for i in range(self.count)
            ]
        )
        return {
            "failed": sum(r["failed"] for r in replies),
            "errors": [e for r in replies for e in r["errors"]][:5],
            "seconds": time.monotonic() - started,
        }

    async def stats(self, *, reset: bool = False) -> dict[str, Any]:
        replies = await self.all({"cmd": "stats", "reset": reset})
        hist: Counter[int] = Counter()
        per_second: Counter[int] = Counter()
        for r in replies:
            hist.update({int(k): v for k, v in r["hist"].items()})
            per_second.update({int(k): v for k, v in r["per_second"].items()})
        firsts = [r["first_receipt"] for r in replies if r["first_receipt"]]
        return {
            "events": sum(r["events"] for r in replies),
            "hist": hist,
            "per_second": per_second,
            "first_receipt": min(firsts) if firsts else 0.0,
            "last_receipt": max(r["last_receipt"] for r in replies),
            "open": sum(r["open"] for r in replies),
            "server_closed": sum(r["server_closed"] for r in replies),
        }

    async def close_streams(self) -> None:
        await self.all({"cmd": "close"})

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(b'{"cmd": "quit"}\n')
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.procs = []


def percentile(hist: Counter[int], q: float) -> float | None:
    """The q-quantile of a 0.1 ms-bucket histogram, in ms (upper edge of the bucket)."""
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round((bucket + 1) / 10, 1)
    return round((max(hist) + 1) / 10, 1)


# --- CPU accounting ----------------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds (user + system) of named processes between two points, as % of one core."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _now(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[name] = t.user + t.system
        return out

    def start(self) -> None:
        self._start, self._t0 = self._now(), time.monotonic()

    def percent(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self._t0)
        now = self._now()
        return {name: round(100 * (now[name] - self._start.get(name, 0.0)) / wall, 1) for name in now}


# --- the systems under test --------------------------------------------------------------------------
class System:
    """A system under test: a web process serving SSE on `port` at `path`, fed from `topic` by `feeder`.

    The gateway's has metrics (/metrics) and a store; the peer's has neither.
    """

    def __init__(
        self, name: str, *, port: int, path: str, topic: str, web: Proc, feeder: Proc, gateway: Gateway | None
    ) -> None:
        self.name = name
        self.port = port
        self.path = path
        self.topic = topic
        self.web = web
        self.feeder = feeder
        self.gateway = gateway
        self.ps = psutil.Process(web.pid)

    @property
    def has_metrics(self) -> bool:
        return self.gateway is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the web process has used so far."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        else:
            await self.feeder.stop()
            await self.web.stop()


class Bench:
    """One run: the broker, Redis, SSE client workers and producer every system shares, one after another."""

    def __init__(self, args: argparse.Namespace, scale: Scale) -> None:
        self.args = args
        self.scale = scale
        self.redis = RedisServer()
        self.kafka = KafkaBroker()
        self.clients = Clients(scale.clients)
        self.producer: AIOKafkaProducer | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="events-gateway-bench-"))

    async def start(self) -> None:
        self.redis.start()
        self.kafka.start()
        log(f"redis {self.redis.url}, broker {self.kafka.bootstrap}, scratch {self.tmp}")
        await self.clients.start()
        self.producer = await start_producer(self.kafka.bootstrap, linger_ms=0)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
        await self.clients.stop()
        self.kafka.stop()
        self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def meter(self, system: System) -> CpuMeter:
        procs = {
            "web": system.web.pid,
            "consumer" if system.has_metrics else "feeder": system.feeder.pid,
            "redis": self.redis.proc.pid if self.redis.proc else 0,
            "broker": self.kafka.proc.pid if self.kafka.proc else 0,
            "bench (producer)": os.getpid(),
        }
        for i, pid in enumerate(self.clients.pids):
            procs[f"client{i}"] = pid
        return CpuMeter({k: v for k, v in procs.items() if v})

    # --- the store (the gateway's only) ------------------------------------------------------------------
    async def store_mark(self, system: System) -> str | None:
        """The gateway's last stored event id (None for the peer, which stores nothing)."""
        if not system.has_metrics:
            return None
        client = aioredis.from_url(self.redis.url)
        try:
            value: Any = await client.get(routing.LAST_ID_KEY)
        finally:
            await client.aclose()
        return value.decode() if value else "0-0"

    async def store_leg(self, system: System, after: str | None) -> dict[str, Any] | None:
        """Kafka record timestamp -> the consumer storing it in Redis (`received_at`), for events after `after`.

        The part of the end-to-end latency spent before the web process sees the event: producer, broker,
        consumer fetch, validation.
        """
        if after is None:
            return None
        client = aioredis.from_url(self.redis.url)
        hist: Counter[int] = Counter()
        try:
            start = f"({after}"
            while True:
                batch: Any = await client.xrange(routing.EVENTS_STREAM, min=start, count=10_000)
                for _, fields in batch:
                    if fields.get(b"kafka_topic") == system.topic.encode():
                        leg = int(fields[b"received_at"]) - int(fields[b"published_at"])
                        hist[max(0, leg) * 10] += 1
                if len(batch) < 10_000:
                    break
                start = f"({batch[-1][0].decode()}"
        finally:
            await client.aclose()
        return {"events": sum(hist.values()), "p50_ms": percentile(hist, 0.5), "p99_ms": percentile(hist, 0.99)}

    # --- producing ---------------------------------------------------------------------------------------
    async def produce(
        self, topic: str, *, total: int, rate: float, make: Callable[[int], tuple[bytes, bytes]]
    ) -> float:
        """Send `total` records at `rate`/s; returns the wall time it took."""
        assert self.producer is not None
        futures = []
        started = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            while sent < due:
                key, value = make(sent)
                futures.append(await self.producer.send(topic, value, key=key))
                sent += 1
            await asyncio.sleep(TICK_SECONDS)
        await self.producer.flush()
        failed = sum(1 for r in await asyncio.gather(*futures, return_exceptions=True) if isinstance(r, Exception))
        if failed:
            log(f"  ! {failed} records failed to produce")
        return time.monotonic() - started

    async def drain(self, expected: int) -> dict[str, Any]:
        """Wait until `expected` deliveries arrived or progress stops; the stats since the last reset."""
        deadline = time.monotonic() + DRAIN_MAX_SECONDS
        last, last_change = -1, time.monotonic()
        while True:
            stats = await self.clients.stats()
            if stats["events"] >= expected:
                return stats
            if stats["events"] != last:
                last, last_change = stats["events"], time.monotonic()
            if time.monotonic() - last_change > DRAIN_IDLE_SECONDS or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.25)

    # --- streams -----------------------------------------------------------------------------------------
    async def open_streams(self, system: System, count: int, users: int) -> dict[str, Any]:
        tokens = [user_token(i % users) for i in range(count)]
        opened = await self.clients.open(system.port, system.path, tokens, self.scale.connect_concurrency)
        if opened["failed"]:
            log(f"  ! {opened['failed']} streams failed to open: {opened['errors']}")
        return opened

    async def close_streams(self, system: System) -> float:
        """Close every client stream; for the gateway, wait until the web process has let them all go."""
        started = time.monotonic()
        await self.clients.close_streams()
        if system.has_metrics:

            async def gone() -> bool:
                return (await metric_values(system.url)).get("gateway_open_streams", 1) == 0

            await wait_until(
                gone,
                timeout=120,
                interval=0.1,
                what="streams closed on the server",
                watch=[system.web],
                ignore=(OSError, ValueError),
            )
        return time.monotonic() - started

    async def settled(self, system: System, tasks_at_most: float | None = None, within: float = 30) -> None:
        """Wait (at most `within` s, then go on) until no stream is open and tasks are back to `tasks_at_most`."""

        async def done() -> bool:
            values = await metric_values(system.url)
            if values.get("gateway_open_streams", 1) != 0:
                return False
            return tasks_at_most is None or values.get("gateway_asyncio_tasks", 0) <= tasks_at_most

        with contextlib.suppress(WaitTimeout):
            await wait_until(
                done,
                timeout=within,
                interval=0.1,
                what="streams and tasks settled",
                watch=[system.web],
                ignore=(OSError, ValueError),
            )


# --- the result ----------------------------------------------------------------------------------------
SUMMARY_KEYS = (
    "a_p50_ms",
    "a_p99_ms",
    "a_lost",
    "b20_p99_ms",
    "b20_lost",
    "b50_deliveries_per_s",
    "b50_p99_ms",
    "c_streams",
    "c_kb_per_stream",
    "c_connect_s",
)


def flat(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one system under the keys the issue asks for (None: not run)."""
    out: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    if "a" in result:
        a = result["a"]
        out.update(a_p50_ms=a["p50_ms"], a_p99_ms=a["p99_ms"], a_lost=a["lost"], a_web_cpu=a["cpu_percent"]["web"])
    for key, b in result.items():
        if key.startswith("b") and key[1:].isdigit():
            out.update(
                {
                    f"{key}_deliveries_per_s": b["deliveries_per_s"],
                    f"{key}_p50_ms": b["p50_ms"],
                    f"{key}_p99_ms": b["p99_ms"],
                    f"{key}_lost": b["lost"],
                    f"{key}_expected": b["expected"],
                }
            )
    if "c" in result:
        c = result["c"]
        out.update(
            c_streams=c["streams"],
            c_kb_per_stream=c["kb_per_stream"],
            c_connect_s=c["connect_s"],
            c_web_cpu_ms_per_connect=c.get("web_cpu_ms_per_connect"),
            c_threads_after=c["threads_after"],
        )
    if "e" in result:
        e = result["e"]
        out.update(
            e_streams=e["streams"],
            e_reconnect_s=e["reconnect_s"],
            e_missing=e["missing"],
            e_duplicated=e["duplicated"],
            e_server_errors=e["server_errors"],
            e_statuses=e["statuses"],
            e_queries_per_reconnect=e["queries_per_reconnect"],
        )
    if "d" in result:
        d = result["d"]
        out.update(
            d_cycles=d["cycles"],
            d_tasks_before=d["tasks_before"],
            d_tasks_after=d["tasks_after"],
            d_rss_delta_kb=d["rss_delta_kb"],
        )
    return out
