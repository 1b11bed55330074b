"""Several web and consumer processes, slow clients, stream limits across processes, CORS, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import urllib.request
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from scripts.embedded import KafkaBroker, RedisServer
from subscriptions.models import Subscription
from tests.harness import Gateway, Layout, running, token, wait_until
from tests.sse_client import open_stream

# The database is used here as the other end-to-end tests use it: the PostgreSQL pass leaves these out.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.incidental_db]


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample from a process's /metrics (0 if absent)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", re.MULTILINE)
    match = pattern.search(text)
    return float(match[1]) if match else 0.0


@pytest.fixture(scope="module")
def shared_layout() -> Layout:
    """Two web processes and two consumers sharing a 4-partition topic, for the module's tests."""
    env = {"EVENTS_MAX_STREAMS_PER_USER": "2", "CORS_ALLOWED_ORIGINS": "https://renderer.example"}
    return Layout(webs=2, consumers=2, partitions=4, env=env)


@pytest.fixture
def deployment(shared_gateway: Gateway) -> Gateway:
    """This module's tests share one deployment (shared_layout above)."""
    return shared_gateway


async def test_every_stream_on_every_web_process_gets_its_events(deployment: Gateway) -> None:
    webs = [url for _, url in deployment.webs]
    users = [f"user-{n}" for n in range(4)]
    streams = {
        (user, web): await open_stream(web, token=token(user)) for user in users for web in webs
    }  # each user has one stream on each web process
    try:
        expected: dict[str, list[object]] = {user: [] for user in users}
        for n in range(80):
            if n % 10 == 0:
                await deployment.produce({"broadcast": True, "data": n}, key=f"k{n}")
                for user in users:
                    expected[user].append(n)
            else:
                user = users[n % 4]
                await deployment.produce({"user": user, "data": n}, key=f"k{n}")
                expected[user].append(n)
        for (user, _), stream in streams.items():
            got = [e.json()["data"] for e in await stream.events(len(expected[user]), timeout=30)]
            # Order across partitions is not defined; each event exactly once is.
            assert sorted(got) == sorted(expected[user])  # type: ignore[type-var]
    finally:
        for stream in streams.values():
            await stream.close()


async def test_stream_limit_per_user_holds_across_web_processes(deployment: Gateway) -> None:
    first_web, second_web = (url for _, url in deployment.webs)
    one = await open_stream(first_web, token=token("lim"))
    two = await open_stream(second_web, token=token("lim"))
    three = await open_stream(first_web, token=token("lim"))
    try:
        assert (one.status, two.status, three.status) == (200, 200, 429)
        assert "at most 2" in json.loads(three.body)["error"]
        await one.close()

        async def reopened() -> bool:
            attempt = await open_stream(second_web, token=token("lim"))
            ok = attempt.status == 200
            await attempt.close()
            return ok

        await wait_until(reopened, what="a slot to free up after a stream closed")
    finally:
        for stream in (one, two, three):
            await stream.close()


async def test_cors_allows_listed_origins_with_credentials_only(deployment: Gateway) -> None:
    def preflight(origin: str) -> dict[str, str]:
        request = urllib.request.Request(
            deployment.url + "/api/events/tickets",
            method="OPTIONS",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return {k.lower(): v for k, v in response.headers.items()}

    allowed = await asyncio.to_thread(preflight, "https://renderer.example")
    assert allowed["access-control-allow-origin"] == "https://renderer.example"
    assert allowed["access-control-allow-credentials"] == "true"
    assert "Authorization" in allowed["access-control-allow-headers"]
    refused = await asyncio.to_thread(preflight, "https://evil.example")
    assert "access-control-allow-origin" not in refused

    async with await open_stream(
        deployment.url, token=token("cors"), headers={"Origin": "https://renderer.example"}
    ) as stream:
        assert stream.headers["access-control-allow-origin"] == "https://renderer.example"
        assert stream.headers["access-control-allow-credentials"] == "true"
    async with await open_stream(deployment.url, token=token("cors"), headers={"Origin": "https://evil.example"}) as s:
        assert "access-control-allow-origin" not in s.headers


async def test_a_client_that_stops_reading_is_closed_without_slowing_others(
    kafka: KafkaBroker, redis_server: RedisServer, db_url: str
) -> None:
    gw = Gateway(
        bootstrap=kafka.bootstrap,
        redis_url=redis_server.url,
        database_url=db_url,
        layout=Layout(partitions=1, env={"EVENTS_STREAM_BUFFER": "50"}),
    )
    slow = socket.socket()
    try:
        await gw.start()
        web = gw.url
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", int(web.rsplit(":", 1)[1])))
        request = f"GET /api/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token('slow')}\r\n"
        slow.sendall(request.encode() + b"\r\n")
        assert slow.recv(12) == b"HTTP/1.1 200"  # then it never reads again
        async with await open_stream(web, token=token("fast")) as fast:
            big = "x" * 16_000
            for n in range(1500):
                await gw.produce({"user": "slow", "data": {"n": n, "pad": big}}, key="k")
                if n % 15 == 0:
                    await gw.produce({"user": "fast", "data": n // 15}, key="k")
            got = await fast.events(100, timeout=60)
            assert [e.json()["data"] for e in got] == list(range(100))
        closed = await wait_until(
            lambda: Subscription.objects.filter(user="slow", closed_at__isnull=False).afirst(),
            timeout=30,
            what="the slow stream to be closed",
        )
        assert closed.close_reason == Subscription.CloseReason.SLOW_CLIENT
        assert closed.events_delivered < 1500
        # The server dropped the connection (reset) rather than buffering 24 MB for it.
        slow.settimeout(10)
        total = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := slow.recv(1 << 20):
                total += len(chunk)
        assert total < 24_000_000
    finally:
        slow.close()
        await gw.stop()


async def test_a_thousand_connect_disconnect_cycles_leave_nothing_behind(shared_cycles_gateway: Gateway) -> None:
    web = shared_cycles_gateway.url
    for n in range(20):  # warm up: the hub, connections, caches
        async with await open_stream(web, token=token(f"cycle-{n % 5}")) as stream:
            await stream.next_block()
    tasks_before = metric(web, "gateway_asyncio_tasks")
    rss_before = metric(web, "process_resident_memory_bytes")

    async def cycle(n: int) -> None:
        async with await open_stream(web, token=token(f"cycle-{n % 5}")) as stream:
            assert stream.status == 200
            await stream.next_block()

    for start in range(0, 1000, 20):
        await asyncio.gather(*(cycle(n) for n in range(start, start + 20)))
    await wait_until(lambda: metric(web, "gateway_open_streams") == 0, what="every stream to be cleaned up")
    await wait_until(
        lambda: metric(web, "gateway_asyncio_tasks") <= tasks_before + 2, what="tasks to return to the baseline"
    )
    rss_growth = metric(web, "process_resident_memory_bytes") - rss_before
    assert rss_growth < 16 * 1024 * 1024, f"RSS grew {rss_growth / 1e6:.1f} MB over 1,000 cycles"


@pytest_asyncio.fixture
async def shared_cycles_gateway(kafka: KafkaBroker, redis_server: RedisServer, db_url: str) -> AsyncIterator[Gateway]:
    """One web process and no consumer: the cycles need no events."""
    layout = Layout(consumers=0, env={"EVENTS_MAX_STREAMS_PER_USER": "1000", "AUDIT_DELIVERIES": "all"})
    async with running(bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url, layout=layout) as gw:
        yield gw
