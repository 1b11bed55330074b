"""`./scripts/run`: the whole gateway on embedded defaults, for trying it out.

Starts Redis and a Kafka-protocol broker on free local ports (unless REDIS_URL / KAFKA_BOOTSTRAP_SERVERS
are set), migrates a local SQLite database, creates a demo user, then runs the web server, the
consumer and a demo producer until Ctrl-C, which stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scripts.embedded import KafkaBroker, RedisServer, ServiceUnavailable, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO_USER, DEMO_PASSWORD = "demo", "demo-password"
DEMO_PROCESS = "demo-process-1"


def _run(argv: list[str], env: dict[str, str]) -> None:
    subprocess.run(argv, cwd=ROOT, env=env, check=True)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} did not come up: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - a local URL built here
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


async def _demo_producer(bootstrap: str, topic: str, interval: float) -> None:
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415 - only this child process needs it

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        tick = 0
        while True:
            tick += 1
            envelopes: list[dict[str, object]] = [
                {"user": DEMO_USER, "event": "Notification", "data": {"text": f"hello #{tick}", "tick": tick}},
                {
                    "processInstanceUuid": DEMO_PROCESS,
                    "event": "ProcessMetadata",
                    "data": {"progressUpdateDTO": {"currentNodeId": f"node-{tick % 5}"}},
                },
            ]
            if tick % 5 == 0:
                envelopes.append({"broadcast": True, "event": "Announcement", "data": {"text": "to everyone"}})
            for envelope in envelopes:
                key = str(envelope.get("processInstanceUuid") or envelope.get("user") or "").encode() or None
                await producer.send_and_wait(topic, json.dumps(envelope).encode(), key=key)
            await asyncio.sleep(interval)
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--demo-interval", type=float, default=2.0, help="seconds between demo events (0: off)")
    parser.add_argument("--demo-producer-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.demo_producer_child:
        asyncio.run(
            _demo_producer(env["KAFKA_BOOTSTRAP_SERVERS"], env["KAFKA_TOPICS"].split(",")[0], args.demo_interval)
        )
        return

    started: list[RedisServer | KafkaBroker] = []
    children: list[subprocess.Popen[bytes]] = []
    try:
        if "REDIS_URL" not in env:
            redis = RedisServer().start()
            started.append(redis)
            env["REDIS_URL"] = redis.url
        if "KAFKA_BOOTSTRAP_SERVERS" not in env:
            broker = KafkaBroker().start()
            started.append(broker)
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
            # The embedded broker holds an empty fetch for the whole wait even when records arrive.
            env.setdefault("KAFKA_FETCH_MAX_WAIT_MS", "10")
    except ServiceUnavailable as exc:
        for service in started:
            service.stop()
        raise SystemExit(f"cannot start the embedded services: {exc}") from exc

    env.setdefault("DJANGO_DEBUG", "true")
    env.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(32))
    env.setdefault("JWT_SECRET", secrets.token_urlsafe(32))
    env.setdefault("JWT_ALGORITHMS", "HS256")
    env.setdefault("CONSUMER_METRICS_PORT", str(free_port()))
    env.setdefault("KAFKA_TOPICS", "messaging_events_topic")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DEMO_ENABLED", "true")  # the page this command points the user to
    python = sys.executable
    try:
        _run([python, "manage.py", "migrate", "--verbosity", "0"], env)
        _run(
            [
                python,
                "manage.py",
                "demo_setup",
                "--user",
                DEMO_USER,
                "--password",
                DEMO_PASSWORD,
                "--process-instance",
                DEMO_PROCESS,
            ],
            env,
        )
        web = subprocess.Popen(
            [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(args.port), "gateway_project.asgi:application"],
            cwd=ROOT,
            env=env,
        )
        children.append(web)
        children.append(subprocess.Popen([python, "manage.py", "run_consumer"], cwd=ROOT, env=env))
        base = f"http://127.0.0.1:{args.port}"
        _wait_http(base + "/healthz", web)
        if args.demo_interval > 0:
            children.append(
                subprocess.Popen(
                    [python, "-m", "scripts.dev", "--demo-producer-child", "--demo-interval", str(args.demo_interval)],
                    cwd=ROOT,
                    env=env,
                )
            )
        print(
            f"\n  events-gateway is running at {base}/\n"
            f"  demo page:   {base}/demo/          (log in as {DEMO_USER} / {DEMO_PASSWORD})\n"
            f"  admin:       {base}/admin/         (same user; it is a superuser)\n"
            f"  publish:     DJANGO_DEBUG=true KAFKA_BOOTSTRAP_SERVERS={env['KAFKA_BOOTSTRAP_SERVERS']} "
            f".venv/bin/python manage.py publish_event --user {DEMO_USER} --event Data --data '{{\"x\": 1}}'\n"
            f"  Redis {env['REDIS_URL']}, Kafka {env['KAFKA_BOOTSTRAP_SERVERS']}; Ctrl-C stops everything.\n",
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        # Ctrl-C in a terminal reaches the children too; only an unexpected exit is worth a word.
        failed = [str(child.args) for child in children if child.poll() not in (0, -2, -15, None)]
        if failed:
            print(f"stopping: a gateway process failed: {failed}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        for service in reversed(started):
            service.stop()


if __name__ == "__main__":
    main()
