"""Delivery benchmark: Kafka -> consumer -> Redis -> web process -> SSE client, against a peer.

Starts everything itself on free loopback ports (Tansu broker, Redis, one daphne web process, one consumer),
drives it with aiokafka and with bench/sseclient.py worker processes, and stops it all at the end:

    (a) N streams, each following its own user; R events/s keyed by user for S seconds: latency, loss
    (b) the same streams on one broadcast at 20 then 50 events/s: deliveries/s achieved, latency, loss
    (c) many idle streams: web-process RSS per stream and the time to connect them all
    (d) connect/disconnect cycles: web RSS and asyncio tasks before and after (no leaks)

Systems, run one after the other in the same run so they never share the 2 cores:
    ours        the gateway as configured (AUDIT_DELIVERIES from --audit)
    audit-off   the gateway with AUDIT_DELIVERIES=off: (a) and (b20), the audit cost (issue 5)
    core-layer  the gateway on channels_redis' core layer (bench/settings_core_layer.py): (a) and (b20)
    peer        django-eventstream 5.3.4 on the same stack (bench/peer, its own virtualenv bench/.peer-venv)

Latency is the client's receipt time minus the event's `publishedAt` (the Kafka record timestamp, in
milliseconds, so figures carry up to 1 ms of truncation). Loss is expected deliveries minus received.

    .venv/bin/python bench/delivery.py                       # everything (about 10 minutes)
    .venv/bin/python bench/delivery.py --quick               # a small smoke run
    .venv/bin/python bench/delivery.py --workloads a,b --systems ours,peer --profile

Prints figures as it goes, writes bench/results/delivery.json, and the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import psutil
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.embedded import KafkaBroker, RedisServer, free_port  # noqa: E402

EVENTS_STREAM = "events-gateway:events"  # events/routing.py, read here without importing Django
LAST_ID_KEY = "events-gateway:last-id"

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PEER_DIR = BENCH / "peer"
PEER_VENV = BENCH / ".peer-venv"
JWT_SECRET = "bench-jwt-secret-long-enough-for-hs256-signatures"
FD_LIMIT = 65536
PARTITIONS = 4
# The producer's pacing tick: 2,000 events/s go out as ~10-event bursts, like a busy producer's batches.
TICK_SECONDS = 0.005
# After the last event is produced, wait this long without progress before counting the rest as lost.
DRAIN_IDLE_SECONDS = 5.0
DRAIN_MAX_SECONDS = 60.0
# The peer's feeder lets the broker hold an empty fetch as long as the gateway's consumer does
# (events/ingest.py BROKER_WAIT_MS), so that both pay the same Kafka leg.
PEER_FETCH_MAX_WAIT_MS = 10
PAYLOAD = {"progressUpdateDTO": {"currentNodeId": "node-1", "status": "RUNNING", "percent": 42}}


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


QUICK = Scale(
    streams=100, a_rate=200, a_seconds=5, b_seconds=5, idle_streams=500, idle_users=100, cycles=100, clients=1
)


def log(message: str) -> None:
    print(message, flush=True)


def token(user: str) -> str:
    return jwt.encode({"preferred_username": user, "exp": int(time.time()) + 6 * 3600}, JWT_SECRET, "HS256")


def user_name(i: int) -> str:
    return f"bench-u{i:05d}"


# --- processes -----------------------------------------------------------------------------------------
def _raise_fd_limit() -> None:
    """Runs in the child before exec: 10,000 streams need more descriptors than a default soft limit of 1,024.

    Raises the soft limit to the hard one, and the hard one to FD_LIMIT where allowed (CAP_SYS_RESOURCE);
    the limit in force is reported with each system's figures.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for limits in ((FD_LIMIT, FD_LIMIT), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return
        except (ValueError, OSError):
            continue


class Service:
    """A child process in its own session, logging to bench/results/logs/<name>.log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = RESULTS / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_raise_fd_limit,  # noqa: PLW1509 - the parent runs no threads of its own
        )
        self.ps = psutil.Process(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


async def wait_for(check: Callable[[], Any], what: str, service: Service | None = None, within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise RuntimeError(f"{what}: {service.name} exited:\n{service.log_tail()}")
        with contextlib.suppress(OSError, ValueError):
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what}: not within {within:.0f}s" + (f"\n{service.log_tail()}" if service else ""))


async def http_get(port: int, path: str, within: float = 10) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), within)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def metric_values(port: int) -> dict[str, float]:
    """The web process's unlabelled Prometheus samples (gateway_open_streams, gateway_asyncio_tasks, ...)."""
    _, body = await http_get(port, "/metrics")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
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
                preexec_fn=_raise_fd_limit,
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
@dataclass
class System:
    name: str
    port: int
    path: str
    topic: str
    web: Service
    feeder: Service
    has_metrics: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def rss(self) -> int:
        return int(self.web.ps.memory_info().rss)

    def stop(self) -> None:
        self.feeder.stop()
        self.web.stop()


class Bench:
    def __init__(self, args: argparse.Namespace, scale: Scale) -> None:
        self.args = args
        self.scale = scale
        self.suffix = uuid.uuid4().hex[:6]
        self.redis = RedisServer()
        self.kafka = KafkaBroker()
        self.clients = Clients(scale.clients)
        self.producer: AIOKafkaProducer | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="events-gateway-bench-"))
        self.results: dict[str, Any] = {}

    # --- setup -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.redis.start()
        self.kafka.start()
        log(f"redis {self.redis.url}, broker {self.kafka.bootstrap}, scratch {self.tmp}")
        await self.clients.start()
        self.producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap, linger_ms=0)
        await self._retry(self.producer.start, "broker")

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
        await self.clients.stop()
        self.kafka.stop()
        self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def _retry(self, attempt: Callable[[], Any], what: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                await attempt()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def create_topic(self, name: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap)
        await self._retry(admin.start, "broker admin")
        try:
            await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
        finally:
            await admin.close()

    def gateway_env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
            # Production settings: DEBUG's SQL logging alone would double the audit writer's cost.
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "bench-secret-key-" + "x" * 40,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "DATABASE_URL": f"sqlite:///{self.tmp / 'gateway.sqlite3'}",
            "REDIS_URL": self.redis.url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap,
            "JWT_SECRET": JWT_SECRET,
            "JWT_ALGORITHMS": "HS256",
            "EVENTS_MAX_STREAMS_PER_USER": "100000",
            "AUDIT_DELIVERIES": self.args.audit,
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def prepare_database(self) -> None:
        """Migrate the scratch database and create the bench users (as their first stream would)."""
        env = self.gateway_env()
        python = sys.executable
        subprocess.run([python, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        users = max(self.scale.streams, self.scale.idle_users)
        code = (
            "from django.contrib.auth import get_user_model as g; U = g(); "
            f"U.objects.bulk_create([U(username=f'bench-u{{i:05d}}') for i in range({users})], ignore_conflicts=True)"
        )
        subprocess.run([python, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True)

    async def start_gateway(self, name: str, **env_extra: str) -> System:
        topic = f"bench-{self.suffix}-{name}"
        await self.create_topic(topic)
        env = self.gateway_env(KAFKA_TOPICS=topic, KAFKA_GROUP_ID=f"gateway-{topic}", **env_extra)
        port, metrics_port = free_port(), free_port()
        web = Service(
            f"{name}-web",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "gateway_project.asgi:application"],
            env,
        )
        command = ["run_consumer", "--metrics-port", str(metrics_port)]
        if self.args.fetch_max_wait_ms is not None:
            argv = [sys.executable, str(BENCH / "delivery.py"), "_consumer", str(self.args.fetch_max_wait_ms), *command]
        else:
            argv = [sys.executable, "manage.py", *command]
        consumer = Service(f"{name}-consumer", argv, env)
        await wait_for(lambda: _status(port, "/healthz", 200), "web /healthz", web)

        async def assigned() -> bool:
            status, body = await http_get(metrics_port, "/readyz")
            return status == 200 and json.loads(body).get("assigned_partitions", 0) > 0

        await wait_for(assigned, "consumer partitions", consumer)
        system = System(name, port, "/api/events/stream", topic, web, consumer, has_metrics=True)
        # The hub starts with the first stream; open (and drop) one so its tasks are counted in every baseline.
        await self.clients.cycle(port, system.path, [token(user_name(0))], 1, 1)
        return system

    async def start_peer(self) -> System:
        python = ensure_peer_venv()
        topic = f"bench-{self.suffix}-peer"
        await self.create_topic(topic)
        env = {
            **os.environ,
            "PYTHONPATH": str(PEER_DIR),
            "DJANGO_SETTINGS_MODULE": "settings",
            "PEER_REDIS_URL": self.redis.url,
            "PEER_JWT_SECRET": JWT_SECRET,
            "PEER_BOOTSTRAP": self.kafka.bootstrap,
            "PEER_TOPIC": topic,
            "PEER_GROUP": f"peer-{topic}",
            "PEER_FETCH_MAX_WAIT_MS": str(self.args.fetch_max_wait_ms or PEER_FETCH_MAX_WAIT_MS),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("VIRTUAL_ENV", None)
        port = free_port()
        web = Service(
            "peer-web", [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "asgi:application"], env, PEER_DIR
        )
        feeder = Service("peer-feeder", [python, "feeder.py"], env, PEER_DIR)
        await wait_for(lambda: _tcp_open(port), "peer web", web)
        await wait_for(lambda: "feeder ready" in feeder.log_tail(), "peer feeder", feeder)
        system = System("peer", port, "/events/", topic, web, feeder, has_metrics=False)
        await self.clients.cycle(port, system.path, [token(user_name(0))], 1, 1)
        return system

    async def store_mark(self, system: System) -> str | None:
        """The gateway's last stored event id (None for the peer, which stores nothing)."""
        if not system.has_metrics:
            return None
        client = aioredis.from_url(self.redis.url)
        try:
            value: Any = await client.get(LAST_ID_KEY)
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
                batch: Any = await client.xrange(EVENTS_STREAM, min=start, count=10_000)
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

    def meter(self, system: System) -> CpuMeter:
        procs = {
            "web": system.web.proc.pid,
            "consumer" if system.has_metrics else "feeder": system.feeder.proc.pid,
            "redis": self.redis.proc.pid if self.redis.proc else 0,
            "broker": self.kafka.proc.pid if self.kafka.proc else 0,
            "bench (producer)": os.getpid(),
        }
        for i, pid in enumerate(self.clients.pids):
            procs[f"client{i}"] = pid
        return CpuMeter({k: v for k, v in procs.items() if v})

    # --- producing -------------------------------------------------------------------------------------
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

    # --- workloads -------------------------------------------------------------------------------------
    async def open_streams(self, system: System, count: int, users: int) -> dict[str, Any]:
        tokens = [token(user_name(i % users)) for i in range(count)]
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
                return (await metric_values(system.port)).get("gateway_open_streams", 1) == 0

            await wait_for(gone, "streams closed on the server", system.web, within=120)
        return time.monotonic() - started

    async def workload_a(self, system: System) -> dict[str, Any]:
        s = self.scale
        total = int(s.a_rate * s.a_seconds)
        users = [user_name(i).encode() for i in range(s.streams)]

        def make(i: int) -> tuple[bytes, bytes]:
            user = users[i % len(users)]
            value = {"type": "message", "event": "BenchUser", "user": user.decode(), "data": {"seq": i, **PAYLOAD}}
            return user, json.dumps(value).encode()

        await self.clients.stats(reset=True)
        mark = await self.store_mark(system)
        meter = self.meter(system)
        meter.start()
        produce_s = await self.produce(system.topic, total=total, rate=s.a_rate, make=make)
        stats = await self.drain(total)
        cpu = meter.percent()
        out = {
            "streams": s.streams,
            "events": total,
            "rate": s.a_rate,
            "produce_s": round(produce_s, 2),
            "expected": total,
            "received": stats["events"],
            "lost": total - stats["events"],
            "p50_ms": percentile(stats["hist"], 0.50),
            "p99_ms": percentile(stats["hist"], 0.99),
            "p999_ms": percentile(stats["hist"], 0.999),
            "max_ms": percentile(stats["hist"], 1.0),
            "server_closed": stats["server_closed"],
            "cpu_percent": cpu,
            "store_leg": await self.store_leg(system, mark),
        }
        log(
            f"  (a) {system.name}: {s.streams} streams, {s.a_rate}/s for {s.a_seconds:.0f}s: "
            f"p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, max {out['max_ms']} ms, lost {out['lost']}/{total}; "
            f"CPU% {_cpu_text(cpu)}"
        )
        return out

    async def workload_b(self, system: System, rate: int, *, profile: Path | None = None) -> dict[str, Any]:
        """Broadcast at `rate` to every open stream; with `profile`, py-spy records the web process meanwhile."""
        s = self.scale
        total = int(rate * s.b_seconds)

        def make(i: int) -> tuple[bytes, bytes]:
            value = {"type": "message", "event": "BenchBroadcast", "broadcast": True, "data": {"seq": i, **PAYLOAD}}
            return b"broadcast", json.dumps(value).encode()

        await self.clients.stats(reset=True)
        streams = (await self.clients.stats())["open"]
        expected = total * streams
        mark = await self.store_mark(system)
        spy = Profiler(system.web.proc.pid, profile) if profile else None
        meter = self.meter(system)
        meter.start()
        started = time.time()
        produce_s = await self.produce(system.topic, total=total, rate=rate, make=make)
        stats = await self.drain(expected)
        cpu = meter.percent()
        summary = spy.stop() if spy is not None else None
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
            "store_leg": await self.store_leg(system, mark),
        }
        if summary is not None:
            out["profile"] = summary
        log(
            f"  (b{rate}) {system.name}: {streams} streams x {rate}/s for {s.b_seconds:.0f}s: "
            f"{out['deliveries_per_s']} deliveries/s of {rate * streams} offered, p50 {out['p50_ms']} ms, "
            f"p99 {out['p99_ms']} ms, lost {out['lost']}/{expected}, server-closed streams {out['server_closed']}; "
            f"CPU% {_cpu_text(cpu)}"
        )
        return out

    async def workload_c(self, system: System) -> dict[str, Any]:
        s = self.scale
        await asyncio.sleep(2)
        before, threads_before = system.rss(), system.web.ps.num_threads()
        meter = self.meter(system)
        spy = None
        if self.args.profile and system.has_metrics:
            spy = Profiler(system.web.proc.pid, RESULTS / f"profile-{system.name}-c-connect.txt")
        meter.start()
        opened = await self.open_streams(system, s.idle_streams, s.idle_users)
        connect_cpu = meter.percent()
        profile = spy.stop() if spy is not None else None
        await asyncio.sleep(3)
        after, threads_after = system.rss(), system.web.ps.num_threads()
        server_open = None
        if system.has_metrics:
            server_open = (await metric_values(system.port)).get("gateway_open_streams")
        out = {
            "streams": opened["opened"],
            "failed": opened["failed"],
            "connect_s": round(opened["seconds"], 2),
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
        close_s = await self.close_streams(system)
        out["close_s"] = round(close_s, 2)
        log(
            f"  (c) {system.name}: {out['streams']} idle streams connected in {out['connect_s']} s "
            f"({out['failed']} failed), RSS {out['rss_before_mb']} -> {out['rss_after_mb']} MB = "
            f"{out['kb_per_stream']} KB/stream, threads {threads_before} -> {threads_after}; "
            f"all closed on the server after {out['close_s']} s; "
            f"CPU% while connecting {_cpu_text(connect_cpu)}"
        )
        return out

    async def workload_d(self, system: System) -> dict[str, Any]:
        s = self.scale
        tokens = [token(user_name(i)) for i in range(min(s.streams, s.idle_users))]
        # A short warm-up so allocator pools and caches reach their working size before the baseline.
        await self.clients.cycle(system.port, system.path, tokens, max(10, s.cycles // 10), 10)
        await self._settled(system)
        before = await metric_values(system.port)
        rss_before = system.rss()
        run = await self.clients.cycle(system.port, system.path, tokens, s.cycles, 10)
        started = time.monotonic()
        await self._settled(system, tasks_at_most=before.get("gateway_asyncio_tasks"))
        cleanup_s = time.monotonic() - started
        after = await metric_values(system.port)
        rss_after = system.rss()
        out = {
            "cycles": s.cycles,
            "failed": run["failed"],
            "seconds": round(run["seconds"], 2),
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
            f"({run['failed']} failed): "
            f"tasks {out['tasks_before']:.0f} -> {out['tasks_after']:.0f}, RSS {out['rss_before_mb']} -> "
            f"{out['rss_after_mb']} MB ({out['rss_delta_kb']:+} KB), open streams after {out['open_streams_after']:.0f}"
        )
        return out

    async def _settled(self, system: System, tasks_at_most: float | None = None, within: float = 30) -> None:
        async def done() -> bool:
            values = await metric_values(system.port)
            if values.get("gateway_open_streams", 1) != 0:
                return False
            return tasks_at_most is None or values.get("gateway_asyncio_tasks", 0) <= tasks_at_most

        with contextlib.suppress(RuntimeError):
            await wait_for(done, "streams and tasks settled", system.web, within)

    # --- one system ------------------------------------------------------------------------------------
    async def run_system(self, system: System, workloads: set[str], *, b_rates: tuple[int, ...]) -> dict[str, Any]:
        fd_limit = system.web.ps.rlimit(psutil.RLIMIT_NOFILE)[0]
        log(f"== {system.name} (web pid {system.web.proc.pid}, port {system.port}, open-file limit {fd_limit})")
        out: dict[str, Any] = {"rss_start_mb": round(system.rss() / 2**20, 1), "web_fd_limit": fd_limit}
        # (d) first, on the fresh process: (c)'s 10,000 streams leave freed memory that would hide a leak.
        if "d" in workloads and system.has_metrics:
            out["d"] = await self.workload_d(system)
        if "c" in workloads:
            out["c"] = await self.workload_c(system)
        if workloads & {"a", "b"}:
            opened = await self.open_streams(system, self.scale.streams, self.scale.streams)
            log(f"  {opened['opened']} streams open in {opened['seconds']:.1f} s")
            if "a" in workloads:
                out["a"] = await self.workload_a(system)
            if "b" in workloads:
                for rate in b_rates:
                    out[f"b{rate}"] = await self.workload_b(system, rate)
                if self.args.profile and system.name in {"ours", "audit-off"}:
                    path = RESULTS / f"profile-{system.name}-b{max(b_rates)}.txt"
                    log(f"  profiling the web process during (b{max(b_rates)}) again (figures not counted)")
                    out["profile_run"] = await self.workload_b(system, max(b_rates), profile=path)
            await self.close_streams(system)
        return out


def _status(port: int, path: str, expected: int) -> Any:
    async def check() -> bool:
        return (await http_get(port, path, 2))[0] == expected

    return check()


async def _tcp_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())


# --- the peer's virtualenv ---------------------------------------------------------------------------
def ensure_peer_venv() -> str:
    """bench/.peer-venv with bench/peer/requirements.txt installed (re-installed when that file changes)."""
    requirements = PEER_DIR / "requirements.txt"
    stamp = hashlib.sha256(requirements.read_bytes()).hexdigest()
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".requirements-installed"
    if python.exists() and marker.exists() and marker.read_text() == stamp:
        return str(python)
    log(f"creating the peer's virtualenv {PEER_VENV} (django-eventstream 5.3.4)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
        check=True,
    )
    marker.write_text(stamp)
    return str(python)


# --- profiling ---------------------------------------------------------------------------------------
class Profiler:
    """py-spy recording a process until stop(): collapsed stacks at 200 Hz, every thread, not pausing it."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        self.proc: subprocess.Popen[bytes] | None = None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(spy, os.X_OK):
            log("  ! py-spy not installed (pip install py-spy): no profile")
            return
        output.parent.mkdir(parents=True, exist_ok=True)
        argv = [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--nolineno", "--threads"]
        argv += ["--nonblocking", "--output", str(output)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, Any]:
        """Stop recording and summarise; {} when py-spy is missing or recorded nothing."""
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return summarize_profile(self.output)


# Where a sample's time goes: its innermost frame from one of these parts of the stack.
COMPONENTS = [
    ("events/", "gateway: hub, streams, sse (events/)"),
    ("subscriptions/", "gateway: audits (subscriptions/)"),
    ("django/db/", "django ORM / sqlite (auth lookups, audit writes)"),
    ("django/", "django (ASGI handler, streaming response)"),
    ("asgiref/", "asgiref (sync_to_async, ...)"),
    ("daphne/", "daphne (HTTP protocol, app queues)"),
    ("twisted/", "twisted (reactor, socket writes)"),
    ("channels_redis/", "channels_redis layer"),
    ("channels/", "channels"),
    ("redis/", "redis client"),
    ("prometheus_client/", "prometheus_client"),
    ("asyncio/", "asyncio event loop"),
]
THREAD_KINDS = {
    "MainThread": "event loop (main thread)",
    "ThreadPoolExecutor": "asgiref sync_to_async threads (thread-sensitive)",
    "asyncio": "loop default executor (thread_sensitive=False: audit writes)",
}
# Stages of the per-delivery path, counted inclusively (a sample inside any matching frame).
STAGES = [
    ("hub: read store + fan-out", ("_read (events/hub.py)",)),
    ("hub: fan_out", ("fan_out (events/hub.py)",)),
    ("stream: push (queueing)", ("push (events/streams.py)",)),
    ("stream: body generator", ("body (events/streams.py)",)),
    ("stream: _take + audit/metrics record", ("_take (events/streams.py)",)),
    ("layer: announcements", ("_listen (events/hub.py)",)),
    ("django: streaming response", ("send_response (django/core/handlers/asgi.py)",)),
    ("daphne: handle_reply", ("handle_reply (daphne/http_protocol.py)",)),
    ("twisted: socket writes", ("doWrite (twisted/internet/", "writeSomeData (twisted/internet/")),
    ("audit writer thread (db)", ("_write (events/audit.py)",)),
    ("metrics (prometheus observe)", ("observe (prometheus_client/metrics.py)",)),
]


def summarize_profile(path: Path) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> share of samples by component, by stage, and the hottest frames."""
    if not path.exists():
        return {}
    samples: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        collapsed, _, number = line.rpartition(" ")
        if collapsed and number.isdigit():
            samples.append((collapsed.split(";"), int(number)))
    total = sum(c for _, c in samples) or 1
    by_thread: Counter[str] = Counter()
    components: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for stack, count in samples:
        thread, frames = stack[0], stack[1:]
        name = thread.split(": ", 1)[-1]
        by_thread[THREAD_KINDS.get(name.split("-", 1)[0].rstrip("_0123456789"), name)] += count
        if frames:
            leaf[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        where = "other (stdlib, C)"
        for frame in reversed(frames):
            found = next((label for marker, label in COMPONENTS if marker in frame), None)
            if found:
                where = found
                break
        components[where] += count
        for label, markers in STAGES:
            if any(m in f for f in frames for m in markers):
                stages[label] += count

    def share(counter: Counter[str], n: int = 15) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(n)}

    summary: dict[str, Any] = {
        "samples": total,
        "threads": share(by_thread),
        "components_percent": share(components, 20),
        "stages_percent": {label: round(100 * stages[label] / total, 1) for label, _ in STAGES},
        "top_self_percent": share(leaf, 20),
        "top_inclusive_percent": share(inclusive, 30),
        "raw": str(path.relative_to(ROOT)),
    }
    log(f"  profile of the web process ({total} samples at 200 Hz, {path.relative_to(ROOT)}):")
    log("    by thread: " + ", ".join(f"{k} {v}%" for k, v in summary["threads"].items()))
    for name, pct in summary["components_percent"].items():
        log(f"    {pct:5.1f}%  {name}")
    log("    stages (inclusive):")
    for name, pct in summary["stages_percent"].items():
        log(f"    {pct:5.1f}%  {name}")
    log("    hottest frames (self):")
    for name, pct in list(summary["top_self_percent"].items())[:12]:
        log(f"    {pct:5.1f}%  {name}")
    return summary


# --- main ----------------------------------------------------------------------------------------------
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
        out.update(c_streams=c["streams"], c_kb_per_stream=c["kb_per_stream"], c_connect_s=c["connect_s"])
    if "d" in result:
        d = result["d"]
        out.update(
            d_cycles=d["cycles"],
            d_tasks_before=d["tasks_before"],
            d_tasks_after=d["tasks_after"],
            d_rss_delta_kb=d["rss_delta_kb"],
        )
    return out


def code_version() -> str:
    """The commit measured, with `+dirty` when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "events", "gateway_project", "subscriptions"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.decode().strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (100 streams, 5 s phases)")
    parser.add_argument("--workloads", default="a,b,c,d", help="subset of a,b,c,d (default: all)")
    parser.add_argument(
        "--systems",
        default="ours,audit-off,core-layer,peer",
        help="subset of ours,audit-off,core-layer,peer (default: all)",
    )
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None, help="include the peer")
    parser.add_argument("--audit", default="all", choices=["all", "failures", "off"], help="AUDIT_DELIVERIES of 'ours'")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True, help="py-spy during (b)")
    parser.add_argument("--streams", type=int, help="streams in (a) and (b)")
    parser.add_argument("--rate", type=int, help="events/s in (a)")
    parser.add_argument("--seconds", type=float, help="duration of (a)")
    parser.add_argument("--b-rates", help="broadcast events/s in (b), comma list (default 20,50)")
    parser.add_argument("--b-seconds", type=float, help="duration of each (b) phase")
    parser.add_argument("--idle-streams", type=int, help="streams in (c)")
    parser.add_argument("--cycles", type=int, help="connect/disconnect cycles in (d)")
    parser.add_argument("--clients", type=int, help="SSE client worker processes (default 1)")
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        help="experiment: run both consumers (ours and the peer's feeder) with aiokafka's fetch_max_wait_ms at "
        f"this value (default: the gateway as its code has it, the peer at {PEER_FETCH_MAX_WAIT_MS} ms like it)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "delivery.json")
    return parser.parse_args(argv)


def scale_from(args: argparse.Namespace) -> Scale:
    base = QUICK if args.quick else Scale()
    overrides = {
        "streams": args.streams,
        "a_rate": args.rate,
        "a_seconds": args.seconds,
        "b_rates": tuple(int(r) for r in args.b_rates.split(",")) if args.b_rates else None,
        "b_seconds": args.b_seconds,
        "idle_streams": args.idle_streams,
        "cycles": args.cycles,
        "clients": args.clients,
    }
    values = {**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    values["idle_users"] = min(values["idle_users"], values["idle_streams"])
    return Scale(**values)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scale = scale_from(args)
    workloads = set(args.workloads.split(","))
    systems = [s for s in args.systems.split(",") if s]
    if args.peer is False:
        systems = [s for s in systems if s != "peer"]
    elif args.peer and "peer" not in systems:
        systems.append("peer")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log(f"code {code_version()}; scale: {scale}; workloads {sorted(workloads)}; systems {systems}")
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Cancel, so that every `finally` stops what it started (services run in sessions of their own).
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    bench = Bench(args, scale)
    report: dict[str, Any] = {
        "scale": scale.__dict__,
        "workloads": sorted(workloads),
        "audit": args.audit,
        "cores": psutil.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_version(),
        "systems": {},
    }
    await bench.start()
    try:
        if any(s != "peer" for s in systems):
            bench.prepare_database()
        for name in systems:
            if name == "ours":
                system = await bench.start_gateway("ours")
                todo, rates = workloads, scale.b_rates
            elif name == "audit-off":
                system = await bench.start_gateway("audit-off", AUDIT_DELIVERIES="off")
                todo, rates = workloads & {"a", "b"}, scale.b_rates
            elif name == "core-layer":
                system = await bench.start_gateway("core-layer", DJANGO_SETTINGS_MODULE="bench.settings_core_layer")
                todo, rates = workloads & {"a", "b"}, scale.b_rates[:1]
            elif name == "peer":
                system = await bench.start_peer()
                todo, rates = workloads - {"d"}, scale.b_rates
            else:
                raise SystemExit(f"unknown system {name!r}")
            try:
                report["systems"][name] = await bench.run_system(system, todo, b_rates=rates)
            finally:
                system.stop()
            args.output.write_text(json.dumps(report, indent=2, default=str))
    finally:
        await bench.stop()
    summary: dict[str, Any] = flat(report["systems"].get("ours", {}))
    for name in ("audit-off", "core-layer", "peer"):
        if name in report["systems"]:
            summary[name.replace("-", "_")] = flat(report["systems"][name])
    report["summary"] = summary
    args.output.write_text(json.dumps(report, indent=2, default=str))
    log(f"wrote {args.output}")
    return summary


def run_consumer_with_fetch_wait(wait_ms: int, argv: list[str]) -> None:
    """`manage.py <argv>` with every aiokafka consumer built with fetch_max_wait_ms=`wait_ms`.

    An experiment for --fetch-max-wait-ms only: the gateway's code is run unchanged but for that one option,
    to show how much of the latency is the broker holding fetches.
    """
    import aiokafka  # noqa: PLC0415

    original = aiokafka.AIOKafkaConsumer.__init__

    def init(self: Any, *topics: str, **options: Any) -> None:
        original(self, *topics, **{**options, "fetch_max_wait_ms": wait_ms})

    aiokafka.AIOKafkaConsumer.__init__ = init
    from django.core.management import execute_from_command_line  # noqa: PLC0415

    execute_from_command_line(["manage.py", *argv])


if __name__ == "__main__":
    if sys.argv[1:2] == ["_consumer"]:
        run_consumer_with_fetch_wait(int(sys.argv[2]), sys.argv[3:])
        sys.exit(0)
    result = asyncio.run(main(parse_args()))
    print(json.dumps(result), flush=True)
