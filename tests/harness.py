"""One harness for tests and benchmarks: the gateway's two processes on a real broker and Redis.

It starts daphne (the web process) and `manage.py run_consumer` with their environment, creates topics,
signs bearer tokens, produces records, and waits on conditions, failing loudly with the processes' log tails.
It lives with the tests (STYLE.md: tests/ holds "one harness shared with bench/"); bench/ imports it as
`tests.harness`. It imports no Django, so neither side needs settings to use it.

Async first: every wait polls with `asyncio.sleep`, never blocking an event loop. Sync callers (module-scoped
fixtures) use `deployed()`, which runs the same start and stop on event loops of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import jwt
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from scripts.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "test-jwt-secret-that-is-long-enough-for-hs256"
# What tests run with, on top of the production settings: quicker heartbeats, group joins and fetches.
TEST_SETTINGS: Mapping[str, str] = {
    "DJANGO_DEBUG": "true",
    "DJANGO_SECRET_KEY": "test-secret-key-not-for-production",
    "EVENTS_HEARTBEAT_SECONDS": "2",
    # Consumers join and hand on partitions sooner (the broker waits about half of it on a join).
    "KAFKA_SESSION_TIMEOUT_MS": "6000",
    # The embedded broker holds an empty fetch for the whole wait even when records arrive (scripts/dev.py too).
    "KAFKA_FETCH_MAX_WAIT_MS": "10",
    # The browser tests use the demo page, which production leaves off.
    "DEMO_ENABLED": "true",
}
# How long a process may take to answer: a cold Django start on a busy 2-core machine takes seconds.
READY_SECONDS = 60.0
LOG_TAIL_CHARS = 4000


def database_url(settings_dict: dict[str, Any]) -> str:
    """A DATABASE_URL for the test database pytest-django set up."""
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    auth = settings_dict["USER"] + (f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else "")
    host = f"{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}"
    return f"postgres://{auth}@{host}/{settings_dict['NAME']}"


def token(user: str, *, ttl: float = 3600, **claims: Any) -> str:
    """A bearer token the harness's processes accept (HS256 with JWT_SECRET), valid for `ttl` seconds."""
    return jwt.encode({"preferred_username": user, "exp": int(time.time() + ttl), **claims}, JWT_SECRET, "HS256")


# --- waiting ---------------------------------------------------------------------------------------------
class WaitTimeout(AssertionError):
    """A condition did not hold in time, or a process it depended on exited; the message has their logs."""


async def wait_until(
    check: Callable[[], Any],
    *,
    timeout: float = 20,
    interval: float = 0.05,
    what: str = "condition",
    watch: Iterable[Proc] = (),
    ignore: tuple[type[Exception], ...] = (),
) -> Any:
    """Poll `check` (sync, or returning an awaitable) until it returns a truthy value, and return that.

    Fails with WaitTimeout after `timeout` seconds, or as soon as a process in `watch` exits, with the log
    tails of `watch`. Exceptions of the types in `ignore` count as "not yet" (a server not listening yet).
    """
    watched = list(watch)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        for proc in watched:
            if not proc.running:
                raise WaitTimeout(f"{what}: {proc.name} exited with {proc.returncode}\n{_tails([proc])}")
        try:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
        except ignore as exc:
            last_error, result = exc, None
        if result:
            return result
        if time.monotonic() > deadline:
            error = f" (last error: {last_error!r})" if last_error else ""
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{error}\n{_tails(watched)}")
        await asyncio.sleep(interval)


def _tails(procs: Sequence[Proc]) -> str:
    return "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail()}" for p in procs)


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def http_get(url: str, *, timeout: float = 5) -> tuple[int, str]:
    """GET `url` off the event loop: (status, body), error statuses included; OSError if nothing answers."""
    return await asyncio.to_thread(_get, url, timeout)


# --- processes -------------------------------------------------------------------------------------------
def raise_open_files(limit: int) -> None:
    """For preexec_fn: the soft open-file limit up to `limit` where allowed, else up to the hard limit.

    Thousands of streams need more descriptors than a default soft limit of 1,024.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for limits in ((limit, limit), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return
        except (ValueError, OSError):
            continue


class Proc:
    """A child process in a session of its own, its output in a log file; `stop()` is idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        cwd: Path = ROOT,
        log_path: Path | None = None,
        open_files: int | None = None,
    ) -> None:
        self.name = name
        self._log: IO[bytes]
        if log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"gateway-{name}-", suffix=".log")
            self.log_path, self._log = Path(path), os.fdopen(fd, "wb")
        else:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path, self._log = log_path, log_path.open("wb")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # Only setrlimit runs between fork and exec: nothing that needs a lock another thread may hold.
            preexec_fn=functools.partial(raise_open_files, open_files) if open_files else None,  # noqa: PLW1509
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log()[-chars:]

    def signal(self, sig: int) -> None:
        """Signal the process's whole session (daphne and run_consumer have children of their own)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def exited(self, timeout: float) -> int | None:
        """The exit status once the process has exited, or None if it still runs after `timeout` seconds."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            return None

    async def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit status."""
        if self.running:
            self.signal(signal.SIGTERM)
            if await self.exited(timeout) is None:
                self.signal(signal.SIGKILL)
                await self.exited(timeout)
        self._log.close()
        return self.returncode


class Web(NamedTuple):
    proc: Proc
    url: str


class Consumer(NamedTuple):
    proc: Proc
    port: int  # of its ops server: /healthz, /readyz, /metrics


# --- Kafka -----------------------------------------------------------------------------------------------
async def _start_client(client: AIOKafkaAdminClient | AIOKafkaProducer, *, timeout: float = 30) -> None:
    """Start a Kafka client, retrying while a broker that just started does not serve metadata yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.start()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def create_topics(bootstrap: str, partitions: Mapping[str, int]) -> None:
    """Create each topic with its number of partitions (replication 1: one broker)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await _start_client(admin)
    try:
        await admin.create_topics([NewTopic(name, count, 1) for name, count in partitions.items()])
    finally:
        await admin.close()


async def start_producer(bootstrap: str, *, linger_ms: int = 2) -> AIOKafkaProducer:
    """A started producer; the caller stops it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms)
    await _start_client(producer)
    return producer


# --- a deployment ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What a deployment runs: how many of each process, its topic's partitions, and settings of its own."""

    webs: int = 1
    consumers: int = 1
    partitions: int = 3
    env: Mapping[str, str] = field(default_factory=dict)


class Gateway:
    """A gateway deployment: its own topic, dead-letter topic and group, on a given broker, Redis and database.

    `settings` are the environment variables it runs with besides its addresses (TEST_SETTINGS for tests;
    bench/ passes production-like ones); `layout.env` goes on top. `root` and `python` run another source tree's
    processes (default: this checkout, this interpreter). Use: `await start()`, then `await stop()`.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        redis_url: str,
        database_url: str,
        layout: Layout = Layout(),
        settings: Mapping[str, str] = TEST_SETTINGS,
        name: str = "events",
        log_dir: Path | None = None,
        open_files: int | None = None,
        root: Path | None = None,
        python: str | None = None,
    ) -> None:
        self.name = name
        self.root = root or ROOT
        self.python = python or sys.executable
        self.layout = layout
        self.bootstrap = bootstrap
        self.topic = f"{name}-{uuid.uuid4().hex[:8]}"
        self.dlq = f"{self.topic}.DLQ"
        self.env: dict[str, str] = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_TOPICS": self.topic,
            "KAFKA_GROUP_ID": f"gateway-{self.topic}",
            "KAFKA_DLQ_TOPIC": self.dlq,
            "JWT_SECRET": JWT_SECRET,
            "JWT_ALGORITHMS": "HS256",
            "PYTHONUNBUFFERED": "1",
            **({"PYTHONPATH": str(root)} if root is not None else {}),
            **settings,
            **layout.env,
        }
        self.webs: list[Web] = []
        self.consumers: list[Consumer] = []
        self._log_dir = log_dir
        self._open_files = open_files
        self._spawned: Counter[str] = Counter()
        self._producer: AIOKafkaProducer | None = None

    @property
    def url(self) -> str:
        """The first web process's base URL."""
        return self.webs[0].url

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the topics, start the layout's processes together, and wait until each one is ready."""
        await self.create_topics()
        webs = [self._spawn_web(free_port()) for _ in range(self.layout.webs)]
        consumers = [self._spawn_consumer() for _ in range(self.layout.consumers)]
        await _all(*(self._web_ready(web) for web in webs), *(self.wait_consumer(c) for c in consumers))

    async def stop(self) -> None:
        """Stop every process and the producer; safe to call more than once."""
        procs = [c.proc for c in self.consumers] + [w.proc for w in self.webs]
        self.consumers.clear()
        self.webs.clear()
        await asyncio.gather(*(proc.stop() for proc in procs))
        await self.close_producer()

    async def create_topics(self) -> None:
        await create_topics(self.bootstrap, {self.topic: self.layout.partitions, self.dlq: 1})

    async def manage(self, *argv: str) -> None:
        """Run `manage.py <argv>` in this deployment's environment (migrate, shell, ...), failing with its output."""
        proc = await asyncio.create_subprocess_exec(
            self.python,
            "manage.py",
            *argv,
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(argv)} exited with {proc.returncode}:\n{output.decode()}")

    # --- web processes -----------------------------------------------------------------------------------
    async def start_web(self, *, port: int | None = None) -> str:
        """Start one more web process (on `port`, to bring a stopped one back at the same address)."""
        web = self._spawn_web(port or free_port())
        await self._web_ready(web)
        return web.url

    async def stop_web(self, url: str) -> int:
        """Stop the web process serving `url` (its streams drop); returns its port for start_web."""
        for web in self.webs:
            if web.url == url:
                self.webs.remove(web)
                await web.proc.stop()
                return int(url.rsplit(":", 1)[1])
        raise ValueError(f"no web process serves {url}")

    def _spawn_web(self, port: int) -> Web:
        argv = [self.python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "gateway_project.asgi:application"]
        web = Web(self._proc("web", argv), f"http://127.0.0.1:{port}")
        self.webs.append(web)
        return web

    async def _web_ready(self, web: Web) -> None:
        async def healthy() -> bool:
            return (await http_get(web.url + "/healthz", timeout=2))[0] == 200

        what = f"web process {web.url} to answer /healthz"
        await wait_until(healthy, timeout=READY_SECONDS, interval=0.1, what=what, watch=[web.proc], ignore=(OSError,))

    # --- consumers ---------------------------------------------------------------------------------------
    async def start_consumer(self, *, wait: bool = True) -> Proc:
        """Start one more consumer; with `wait`, return once it has partitions assigned."""
        consumer = self._spawn_consumer()
        if wait:
            await self.wait_consumer(consumer)
        return consumer.proc

    async def wait_consumer(self, consumer: Consumer, timeout: float = READY_SECONDS) -> None:
        """Wait until `consumer` reports partitions assigned to it."""

        async def assigned() -> bool:
            status, body = await http_get(f"http://127.0.0.1:{consumer.port}/readyz", timeout=2)
            return status == 200 and json.loads(body).get("assigned_partitions", 0) > 0

        what = f"consumer {consumer.port} to be assigned partitions"
        await wait_until(assigned, timeout=timeout, interval=0.1, what=what, watch=[consumer.proc], ignore=(OSError,))

    def _spawn_consumer(self) -> Consumer:
        port = free_port()
        argv = [self.python, "manage.py", "run_consumer", "--metrics-port", str(port)]
        consumer = Consumer(self._proc("consumer", argv), port)
        self.consumers.append(consumer)
        return consumer

    def _proc(self, kind: str, argv: list[str]) -> Proc:
        self._spawned[kind] += 1
        count = self._spawned[kind]
        name = f"{self.name}-{kind}" + (f"-{count}" if count > 1 else "")
        log_path = self._log_dir / f"{name}.log" if self._log_dir else None
        return Proc(name, argv, self.env, cwd=self.root, log_path=log_path, open_files=self._open_files)

    # --- producing ---------------------------------------------------------------------------------------
    async def producer(self) -> AIOKafkaProducer:
        """This deployment's producer, started on first use on the running event loop."""
        if self._producer is None:
            self._producer = await start_producer(self.bootstrap)
        return self._producer

    async def produce(
        self,
        envelope: dict[str, Any] | bytes,
        *,
        key: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> tuple[int, int]:
        """Produce one record to the topic (keyed like producers do, unless `key`); its partition and offset."""
        producer = await self.producer()
        value = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
        if key is None and isinstance(envelope, dict):
            key = envelope.get("processInstanceUuid") or envelope.get("user")
        meta = await producer.send_and_wait(self.topic, value, key=key.encode() if key else None, headers=headers)
        return meta.partition, meta.offset

    async def close_producer(self) -> None:
        """Stop the producer; it belongs to the event loop that started it (a test's, with shared deployments)."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


async def _all(*waits: Coroutine[Any, Any, None]) -> None:
    """Run the waits together; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for wait in waits:
                group.create_task(wait)
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None


@contextlib.asynccontextmanager
async def running(*, bootstrap: str, redis_url: str, database_url: str, **options: Any) -> AsyncIterator[Gateway]:
    """A started deployment (Gateway's keyword options), stopped on the way out."""
    gateway = Gateway(bootstrap=bootstrap, redis_url=redis_url, database_url=database_url, **options)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()


@contextlib.contextmanager
def deployed(*, bootstrap: str, redis_url: str, database_url: str, **options: Any) -> Iterator[Gateway]:
    """`running` for sync callers (module-scoped fixtures): start and stop run on event loops of their own."""
    gateway = Gateway(bootstrap=bootstrap, redis_url=redis_url, database_url=database_url, **options)
    try:
        asyncio.run(gateway.start())
        yield gateway
    finally:
        asyncio.run(gateway.stop())
