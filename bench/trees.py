"""Source trees measured side by side by bench/scaleout.py, and what a store-to-socket workload runs on one.

A `Tree` is a checkout of the gateway (this one, or another at any commit): its web processes are started from
its directory with its own Python (`<tree>/.venv/bin/python` when it has one) through tests/harness.py's
Gateway, and its events are appended by its own store code (bench/appender.py runs inside it). Nothing of the
tree is imported here: only this checkout's bench code runs in this process.

`Webs` is one workload's deployment: web processes only (no Kafka, no consumer: events go straight to the
store), the tree's appender, and the client workers, on a Redis emptied before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis

from bench.support import BENCH, FD_LIMIT, LOGS, Clients, log, percentile, user_name, user_token
from bench.systems import PATH, SETTINGS
from scripts.embedded import RedisServer
from tests.harness import Gateway, Proc, WaitTimeout, raise_open_files

# Between polls of a web process's memory: short enough to catch a peak that lasts a few tens of ms.
RSS_SAMPLE_SECONDS = 0.005


@dataclass(frozen=True)
class Tree:
    name: str
    root: Path

    @property
    def python(self) -> str:
        own = self.root / ".venv" / "bin" / "python"
        return str(own) if own.exists() else sys.executable

    def code(self) -> str:
        """The commit checked out, with `+dirty` when the code differs from it."""
        try:
            head = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=self.root, capture_output=True, check=True
            )
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--", "events", "gateway_project", "subscriptions"],
                cwd=self.root,
                capture_output=True,
                check=True,
            )
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
        return head.stdout.decode().strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_tree(text: str) -> Tree:
    """`NAME=PATH` (the --tree option)."""
    name, sep, path = text.partition("=")
    root = Path(path).expanduser().resolve()
    if not sep or not name or not (root / "manage.py").exists():
        raise ValueError(f"--tree wants NAME=PATH of a gateway checkout, not {text!r}")
    return Tree(name, root)


# --- worker processes speaking JSON lines ------------------------------------------------------------------
class Worker:
    """A child process answering JSON commands on stdin with JSON replies on stdout, matched by `id`."""

    def __init__(self, name: str, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._log = LOGS / f"{name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        with self._log.open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=1 << 26,
                preexec_fn=functools.partial(raise_open_files, FD_LIMIT),
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError(f"{self.name} exited while starting:\n{self._log.read_text()[-3000:]}")
        self.ready = json.loads(line)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                reply = json.loads(line)
                future = self._waiting.pop(reply.pop("id"), None)
                if future is not None and not future.done():
                    future.set_result(reply)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(RuntimeError(f"{self.name} exited:\n{self._log.read_text()[-3000:]}"))
            self._waiting.clear()

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = future
        try:
            self.proc.stdin.write(json.dumps({"id": self._next, "cmd": cmd, **args}).encode() + b"\n")
            await self.proc.stdin.drain()
        except ConnectionError as exc:
            self._waiting.pop(self._next, None)
            status = await asyncio.wait_for(self.proc.wait(), 10)
            raise RuntimeError(f"{self.name} exited with {status}:\n{self._log.read_text()[-3000:]}") from exc
        reply: dict[str, Any] = await future
        if "error" in reply:
            raise RuntimeError(f"{self.name} {cmd}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                proc.stdin.write(b'{"id": 0, "cmd": "quit"}\n')
                await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class Probe(Worker):
    """bench/sseprobe.py: a few named streams, each watched on its own."""

    def __init__(self, name: str = "sseprobe") -> None:
        super().__init__(name, [sys.executable, str(BENCH / "sseprobe.py")], cwd=BENCH)

    async def open(
        self, name: str, port: int, user: int, *, last_event_id: str | None = None, track_ids: bool = False
    ) -> dict[str, Any]:
        opened = await self.call(
            "open",
            name=name,
            host="127.0.0.1",
            port=port,
            path=PATH,
            token=user_token(user),
            last_event_id=last_event_id,
            track_ids=track_ids,
        )
        if opened["refused"]:
            raise RuntimeError(f"stream {name} on port {port}: {opened['refused']}")
        return opened


def latency(hist: dict[str, int] | dict[int, int]) -> dict[str, Any]:
    """p50/p99/max in ms of a 0.1 ms-bucket histogram (as a worker's JSON reply has it)."""
    counts: Counter[int] = Counter({int(k): v for k, v in hist.items()})
    return {
        "p50_ms": percentile(counts, 0.5),
        "p99_ms": percentile(counts, 0.99),
        "max_ms": percentile(counts, 1.0),
    }


def from_return(returned: dict[str, float], receipts: dict[str, float]) -> dict[str, Any]:
    """Store-to-socket latency from the append call's return (the appender's `returned`) to the client's receipt
    (the probe's `receipts`), over the events in both: p50/p99/max in ms."""
    ms = sorted(1000 * (t - returned[i]) for i, t in receipts.items() if i in returned)
    if not ms:
        return {"events": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "events": len(ms),
        "p50_ms": round(ms[len(ms) // 2], 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1),
        "max_ms": round(ms[-1], 1),
    }


# --- memory and CPU of a web process --------------------------------------------------------------------------
class RssWatch:
    """The peak RSS of a process from now until stop(): VmRSS polled every RSS_SAMPLE_SECONDS in a thread,
    and VmHWM (the kernel's own peak, reset at start where the kernel allows it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _status(self) -> dict[str, int]:
        values = {}
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0]) * 1024
        return values

    def start(self) -> RssWatch:
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as refs:
            refs.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
            self._hwm_reset = True
        self.before = self.peak = self._status().get("VmRSS", 0)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.peak = max(self.peak, self._status().get("VmRSS", 0))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        status = self._status()
        hwm = status.get("VmHWM", 0) if self._hwm_reset else 0
        peak = max(self.peak, hwm)
        return {
            "rss_before_mb": round(self.before / 2**20, 1),
            "rss_peak_mb": round(peak / 2**20, 1),
            "rss_after_mb": round(status.get("VmRSS", 0) / 2**20, 1),
            "peak_growth_mb": round((peak - self.before) / 2**20, 1),
            "peak_from": "VmHWM (reset) and VmRSS polled" if self._hwm_reset else "VmRSS polled",
        }


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (/proc/<pid>/stat utime + stime); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat(5)


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy and has been up (summed over cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    total = sum(ticks[:8])  # user .. steal; guest time is already counted in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def own_processes() -> list[int]:
    """This process and every process it started, however deep (services, web processes, workers)."""
    me = psutil.Process()
    return [me.pid, *(p.pid for p in me.children(recursive=True))]


class CpuWindow:
    """CPU of named processes from start(): `lap()` gives, per name, CPU seconds and % of one core since, and
    `machine`: the whole machine's busy % (of one core; 100 x cores when saturated) and the part of it that
    none of this run's processes used (`others_percent`: other work sharing the cores)."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = {name: pid for name, pid in procs.items() if pid}
        self._start: dict[str, float] = {}
        self._own: dict[int, float] = {}
        self._machine = 0.0
        self._t0 = 0.0

    def start(self) -> CpuWindow:
        self._start = {name: process_cpu_seconds(pid) for name, pid in self.procs.items()}
        self._own = {pid: process_cpu_seconds(pid) for pid in own_processes()}
        self._machine = machine_busy_seconds()[0]
        self._t0 = time.monotonic()
        return self

    def lap(self) -> dict[str, Any]:
        wall = max(1e-9, time.monotonic() - self._t0)
        busy = machine_busy_seconds()[0] - self._machine
        own = sum(max(0.0, process_cpu_seconds(pid) - before) for pid, before in self._own.items())
        out: dict[str, Any] = {
            "wall_s": round(wall, 2),
            "machine": {
                "busy_percent": round(100 * busy / wall, 1),
                "others_percent": round(max(0.0, 100 * (busy - own) / wall), 1),
            },
        }
        for name, pid in self.procs.items():
            seconds = process_cpu_seconds(pid) - self._start[name]
            out[name] = {"cpu_s": round(seconds, 3), "percent": round(100 * seconds / wall, 1)}
        return out


async def calm(*, others_below: float, within: float, sample: float = 2.0) -> dict[str, Any]:
    """Wait (at most `within` s) until work outside this run uses less than `others_below` % of a core over
    `sample` s; what was seen last. The cores are shared: a measurement beside a busy neighbour is not one."""
    started = time.monotonic()
    while True:
        window = CpuWindow({}).start()
        await asyncio.sleep(sample)
        seen = window.lap()["machine"]
        waited = time.monotonic() - started
        if seen["others_percent"] < others_below or waited >= within:
            return {**seen, "waited_s": round(waited, 1), "calm": seen["others_percent"] < others_below}


def others_seen(value: Any) -> list[float]:
    """Every `others_percent` in a nested result."""
    if isinstance(value, dict):
        found = [float(v) for k, v in value.items() if k == "others_percent" and v is not None]
        return found + [
            x for k, v in value.items() if k not in {"machine_before", "others_percent"} for x in others_seen(v)
        ]
    if isinstance(value, list):
        return [x for v in value for x in others_seen(v)]
    return []


def cpu_text(lap: dict[str, Any]) -> str:
    procs = ", ".join(
        f"{name} {v['percent']:.0f}" for name, v in lap.items() if name != "machine" and isinstance(v, dict)
    )
    return f"{procs}; others on the machine {lap['machine']['others_percent']:.0f}"


async def quiet(pid: int, *, below_percent: float = 5.0, window: float = 0.5, within: float = 120.0) -> float:
    """Wait until a process uses less than `below_percent` of a core over `window` (it has caught up with the
    store); returns the seconds waited (gives up after `within` seconds)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        before = process_cpu_seconds(pid)
        await asyncio.sleep(window)
        if 100 * (process_cpu_seconds(pid) - before) / window < below_percent:
            break
    return round(time.monotonic() - started, 2)


# --- one workload's deployment ------------------------------------------------------------------------------
class Webs:
    """Web processes of one tree (no Kafka, no consumer), its appender, and client workers, on a fresh Redis
    state. Use: `async with Webs(run, tree, "name") as webs: await webs.add_web() ...`."""

    def __init__(self, run: Run, tree: Tree, name: str, *, stream_clients: int = 0) -> None:
        self.run = run
        self.tree = tree
        self.name = f"{tree.name}-{name}"
        self.gateway = Gateway(
            bootstrap="127.0.0.1:9",  # never contacted: web processes do not talk to Kafka
            redis_url=run.redis.url,
            database_url=run.database_url(tree),
            settings={**SETTINGS, "AUDIT_DELIVERIES": run.audit},
            name=self.name,
            log_dir=LOGS,
            open_files=FD_LIMIT,
            root=tree.root,
            python=tree.python,
        )
        self.appender = Worker(
            f"{self.name}-appender",
            [tree.python, str(BENCH / "appender.py")],
            cwd=tree.root,
            env=self.gateway.env,
        )
        self.probe = Probe(f"{self.name}-sseprobe")
        self.clients = [Clients(1) for _ in range(stream_clients)]

    async def __aenter__(self) -> Webs:
        client = aioredis.from_url(self.run.redis.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
        try:
            await self.appender.start()
            if Path(self.appender.ready["code"]) != self.tree.root:
                raise RuntimeError(f"the appender runs the code in {self.appender.ready['code']}, not {self.tree.root}")
            await self.probe.start()
            for clients in self.clients:
                await clients.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        for clients in self.clients:
            await clients.stop()
        await self.probe.stop()
        await self.appender.stop()
        await self.gateway.stop()

    async def add_web(self) -> tuple[Proc, int]:
        """One more web process, its hub started (a stream opened and closed), as after its first client."""
        for attempt in range(3):
            try:
                url = await self.gateway.start_web()
                break
            except WaitTimeout as exc:
                # A free port may be taken between choosing it and daphne listening on it (the cores and ports
                # are shared): try another.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
        web = next(w for w in self.gateway.webs if w.url == url)
        port = int(url.rsplit(":", 1)[1])
        cwd = Path(os.readlink(f"/proc/{web.proc.pid}/cwd"))
        if cwd != self.tree.root:
            raise RuntimeError(f"web process {web.proc.pid} runs in {cwd}, not {self.tree.root}")
        await self.probe.open("warm-up", port, 0)
        await self.probe.call("close", name="warm-up")
        return web.proc, port

    async def remove_web(self, port: int) -> None:
        await self.gateway.stop_web(f"http://127.0.0.1:{port}")

    async def append(self, **job: Any) -> dict[str, Any]:
        """One append job of the tree's appender (bench/appender.py `append`)."""
        return await self.appender.call("append", **job)


class Run:
    """What every tree's workloads share in one run: Redis, the scratch databases, the audit mode."""

    def __init__(self, *, audit: str, scratch: Path, calm_below: float, calm_within: float, retries: int) -> None:
        self.redis = RedisServer()
        self.retries = retries
        self.audit = audit
        self.scratch = scratch
        self.calm_below = calm_below
        self.calm_within = calm_within

    async def calm(self) -> dict[str, Any]:
        """Before a measurement: wait a while for other work on the machine to calm down (see `calm`)."""
        if self.calm_within <= 0:
            return {}
        seen = await calm(others_below=self.calm_below, within=self.calm_within)
        if not seen["calm"]:
            log(f"  ! other work on the machine uses {seen['others_percent']:.0f}% of a core; measuring anyway")
        elif seen["waited_s"] > 5:
            log(f"  (waited {seen['waited_s']:.0f} s for other work on the machine to calm down)")
        return seen

    def disturbed(self, result: dict[str, Any]) -> float | None:
        """The most CPU other work used in any measurement window of `result` (% of a core), if that is more
        than --calm allows; None when the figures stand."""
        seen = max(others_seen(result), default=0.0)
        return seen if self.calm_within > 0 and seen >= self.calm_below else None

    def database_url(self, tree: Tree) -> str:
        return f"sqlite:///{self.scratch / f'{tree.name}.sqlite3'}"

    async def prepare(self, tree: Tree, users: int) -> None:
        """Migrate the tree's scratch database and create the bench users (as their first stream would)."""
        assert user_name(0) == "bench-u00000"
        code = (
            "from django.contrib.auth import get_user_model as g; U = g(); "
            f"U.objects.bulk_create([U(username=f'bench-u{{i:05d}}') for i in range({users})], ignore_conflicts=True)"
        )
        setup = Gateway(
            bootstrap="127.0.0.1:9",
            redis_url=self.redis.url,
            database_url=self.database_url(tree),
            settings=SETTINGS,
            name=f"{tree.name}-setup",
            root=tree.root,
            python=tree.python,
        )
        started = time.monotonic()
        await setup.manage("migrate", "-v0")
        await setup.manage("shell", "-c", code)
        log(f"  {tree.name}: database migrated, {users} users, in {time.monotonic() - started:.1f} s")

    def redis_pid(self) -> int:
        return self.redis.proc.pid if self.redis.proc else 0
