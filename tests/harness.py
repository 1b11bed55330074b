"""Runs the real gateway for tests: daphne and run_consumer processes against a real broker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from scripts.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "test-jwt-secret-that-is-long-enough-for-hs256"


def database_url(settings_dict: dict[str, Any]) -> str:
    """A DATABASE_URL for the test database pytest-django set up."""
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    auth = settings_dict["USER"] + (f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else "")
    host = f"{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}"
    return f"postgres://{auth}@{host}/{settings_dict['NAME']}"


def token(user: str, *, ttl: float = 3600, **claims: Any) -> str:
    return jwt.encode({"preferred_username": user, "exp": int(time.time() + ttl), **claims}, JWT_SECRET, "HS256")


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        fd, path = tempfile.mkstemp(prefix=f"gateway-{name}-", suffix=".log")
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Gateway:
    """A gateway deployment for one test module: its own topics, group, Redis, and processes."""

    def __init__(
        self,
        *,
        bootstrap: str,
        redis_url: str,
        database_url: str,
        partitions: int = 3,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.bootstrap = bootstrap
        self.topic = f"events-{suffix}"
        self.dlq = f"events-{suffix}.DLQ"
        self.partitions = partitions
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
            "DJANGO_DEBUG": "true",
            "DJANGO_SECRET_KEY": "test-secret-key-not-for-production",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_TOPICS": self.topic,
            "KAFKA_GROUP_ID": f"gateway-{suffix}",
            "KAFKA_DLQ_TOPIC": self.dlq,
            "JWT_SECRET": JWT_SECRET,
            "JWT_ALGORITHMS": "HS256",
            "EVENTS_HEARTBEAT_SECONDS": "2",
            # Consumers join and hand on partitions sooner (the broker waits about half of it on a join).
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.webs: list[tuple[Proc, str]] = []
        self.consumers: list[tuple[Proc, int]] = []
        self._producer: AIOKafkaProducer | None = None

    # --- processes -------------------------------------------------------------------------------------
    async def create_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic, self.partitions, 1), NewTopic(self.dlq, 1, 1)])
        finally:
            await admin.close()

    def start_web(self, *, port: int | None = None) -> str:
        """Start a web process (on `port`, to bring a stopped one back at the same address)."""
        port = port or free_port()
        proc = Proc(
            "web",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "gateway_project.asgi:application"],
            self.env,
        )
        url = f"http://127.0.0.1:{port}"
        self._wait(lambda: _get(url + "/healthz")[0] == 200, proc, "web server")
        self.webs.append((proc, url))
        return url

    def stop_web(self, url: str) -> int:
        """Stop the web process serving `url` (its streams drop); returns its port for start_web."""
        for entry in self.webs:
            if entry[1] == url:
                self.webs.remove(entry)
                entry[0].stop()
                return int(url.rsplit(":", 1)[1])
        raise ValueError(f"no web process serves {url}")

    def start_consumer(self, *, wait: bool = True) -> Proc:
        port = free_port()
        proc = Proc("consumer", [sys.executable, "manage.py", "run_consumer", "--metrics-port", str(port)], self.env)
        self.consumers.append((proc, port))
        if wait:
            self.wait_consumer(proc, port)
        return proc

    def wait_consumer(self, proc: Proc, port: int, timeout: float = 60) -> None:
        def assigned() -> bool:
            status, body = _get(f"http://127.0.0.1:{port}/readyz")
            return status == 200 and json.loads(body).get("assigned_partitions", 0) > 0

        self._wait(assigned, proc, "consumer", timeout)

    def _wait(self, check: Any, proc: Proc, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.proc.returncode}:\n{proc.log()[-4000:]}")
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready within {timeout}s:\n{proc.log()[-4000:]}")

    @property
    def url(self) -> str:
        return self.webs[0][1]

    def stop(self) -> None:
        for proc, _ in self.consumers + self.webs:
            proc.stop()
        self.consumers.clear()
        self.webs.clear()

    # --- producing -------------------------------------------------------------------------------------
    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2)
            await self._producer.start()
        return self._producer

    async def produce(
        self,
        envelope: dict[str, Any] | bytes,
        *,
        key: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> tuple[int, int]:
        producer = await self.producer()
        value = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
        if key is None and isinstance(envelope, dict):
            key = envelope.get("processInstanceUuid") or envelope.get("user")
        meta = await producer.send_and_wait(self.topic, value, key=key.encode() if key else None, headers=headers)
        return meta.partition, meta.offset

    async def close_producer(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


@contextlib.asynccontextmanager
async def running(*, bootstrap: str, redis_url: str, database_url: str, **options: Any) -> AsyncIterator[Gateway]:
    """A deployment on new topics with one web process and one consumer, stopped on the way out."""
    gateway = Gateway(bootstrap=bootstrap, redis_url=redis_url, database_url=database_url, **options)
    await gateway.create_topics()
    try:
        gateway.start_web()
        gateway.start_consumer()
        yield gateway
    finally:
        gateway.stop()
        await gateway.close_producer()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def wait_until(check: Any, *, timeout: float = 20, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
