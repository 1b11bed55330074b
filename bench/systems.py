"""The systems the delivery benchmark compares, each started on its own topic and stopped after its workloads.

ours, audit-off, core-layer   the gateway (tests/harness.py's deployment: one web process, one consumer)
                              on production-like settings, with AUDIT_DELIVERIES or the layer changed
peer                          django-eventstream 5.3.4 (bench/peer) under daphne, fed by bench/peer/feeder.py,
                              from its own virtualenv bench/.peer-venv
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import uuid

from bench.support import BENCH, FD_LIMIT, LOGS, PARTITIONS, Bench, System, log, user_token
from scripts.embedded import free_port
from tests.harness import JWT_SECRET, READY_SECONDS, Gateway, Layout, Proc, create_topics, wait_until

PEER_DIR = BENCH / "peer"
PEER_VENV = BENCH / ".peer-venv"
PATH = "/api/events/stream"
# Production settings: DEBUG's SQL logging alone would double the audit writer's cost.
SETTINGS = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "bench-secret-key-" + "x" * 40,
    "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
    "LOG_LEVEL": "WARNING",
    "EVENTS_MAX_STREAMS_PER_USER": "100000",
}
# How long the broker may hold an empty fetch, for both consumers (the gateway's and the peer's feeder), so that
# both pay the same Kafka leg. Tansu answers a held fetch only when the wait ends, records or not, so the
# gateway's default (500 ms) would dominate the latency here; scripts/dev.py runs it at 10 ms too.
FETCH_MAX_WAIT_MS = 10


def gateway(bench: Bench, name: str, *, webs: int = 1, env: dict[str, str] | None = None) -> Gateway:
    """The gateway as `name` runs it (`webs` web processes): AUDIT_DELIVERIES from --audit unless `env` says
    otherwise."""
    fetch_wait = bench.args.fetch_max_wait_ms or FETCH_MAX_WAIT_MS
    settings = {"AUDIT_DELIVERIES": bench.args.audit, "KAFKA_FETCH_MAX_WAIT_MS": str(fetch_wait), **(env or {})}
    return Gateway(
        bootstrap=bench.kafka.bootstrap,
        redis_url=bench.redis.url,
        database_url=f"sqlite:///{bench.tmp / 'gateway.sqlite3'}",
        layout=Layout(webs=webs, partitions=PARTITIONS, env=settings),
        settings=SETTINGS,
        name=name,
        log_dir=LOGS,
        open_files=FD_LIMIT,
    )


async def prepare_database(bench: Bench) -> None:
    """Migrate the scratch database and create the bench users (as their first stream would)."""
    users = max(bench.scale.streams, bench.scale.idle_users)
    code = (
        "from django.contrib.auth import get_user_model as g; U = g(); "
        f"U.objects.bulk_create([U(username=f'bench-u{{i:05d}}') for i in range({users})], ignore_conflicts=True)"
    )
    setup = gateway(bench, "setup")
    await setup.manage("migrate", "-v0")
    await setup.manage("shell", "-c", code)


async def start_gateway(bench: Bench, name: str, **env: str) -> System:
    deployment = gateway(bench, name, env=env)
    try:
        await deployment.start()
    except BaseException:
        await deployment.stop()
        raise
    web, consumer = deployment.webs[0], deployment.consumers[0]
    port = int(web.url.rsplit(":", 1)[1])
    system = System(
        name, port=port, path=PATH, topic=deployment.topic, web=web.proc, feeder=consumer.proc, gateway=deployment
    )
    # The hub starts with the first stream; open (and drop) one so its tasks are counted in every baseline.
    await bench.clients.cycle(port, system.path, [user_token(0)], 1, 1)
    return system


async def start_peer(bench: Bench) -> System:
    python = await asyncio.to_thread(ensure_peer_venv)
    topic = f"bench-{uuid.uuid4().hex[:6]}-peer"
    await create_topics(bench.kafka.bootstrap, {topic: PARTITIONS})
    env = {
        **os.environ,
        "PYTHONPATH": str(PEER_DIR),
        "DJANGO_SETTINGS_MODULE": "settings",
        "PEER_REDIS_URL": bench.redis.url,
        "PEER_JWT_SECRET": JWT_SECRET,
        "PEER_BOOTSTRAP": bench.kafka.bootstrap,
        "PEER_TOPIC": topic,
        "PEER_GROUP": f"peer-{topic}",
        "PEER_FETCH_MAX_WAIT_MS": str(bench.args.fetch_max_wait_ms or FETCH_MAX_WAIT_MS),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    port = free_port()
    argv = [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "asgi:application"]
    web = Proc("peer-web", argv, env, cwd=PEER_DIR, log_path=LOGS / "peer-web.log", open_files=FD_LIMIT)
    feeder = Proc(
        "peer-feeder", [python, "feeder.py"], env, cwd=PEER_DIR, log_path=LOGS / "peer-feeder.log", open_files=FD_LIMIT
    )
    system = System("peer", port=port, path="/events/", topic=topic, web=web, feeder=feeder, gateway=None)
    try:
        await wait_until(
            lambda: _accepts(port), timeout=READY_SECONDS, interval=0.1, what="peer web", watch=[web, feeder]
        )
        await wait_until(
            lambda: "feeder ready" in feeder.log(),
            timeout=READY_SECONDS,
            interval=0.1,
            what="peer feeder",
            watch=[feeder],
        )
        await bench.clients.cycle(port, system.path, [user_token(0)], 1, 1)
    except BaseException:
        await system.stop()
        raise
    return system


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


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
