"""Delivery scales out and stays exact: web processes hear only their streams' sources, resumes are exact
across web processes and consumers (also on a process that is behind), and the gateway runs on a Redis
Cluster. Real processes throughout: Tansu, redis-server(s), daphne, run_consumer."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from scripts.embedded import KafkaBroker, RedisClusterServers
from subscriptions.models import Grant
from tests.harness import Gateway, Layout, http_get, running, token, wait_until
from tests.sse_client import SSEConnection, open_stream

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.incidental_db]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


@pytest.fixture(scope="module")
def shared_layout() -> Layout:
    return Layout(webs=2, consumers=2, partitions=4)


async def _grant(user: str, pis: list[str]) -> None:
    now = datetime.now(UTC)
    await Grant.objects.abulk_create(
        [Grant(user=user, process_instance=p, granted_at=now, granted_by="test", source="admin") for p in pis]
    )


async def _read_data(stream: SSEConnection, count: int, timeout: float = 30) -> list[tuple[str | None, object]]:
    events = await stream.events(count, timeout=timeout)
    return [(e.id, e.json()["data"]) for e in events]


async def test_a_web_process_without_streams_hears_nothing(shared_gateway: Gateway) -> None:
    busy, idle = (web.url for web in shared_gateway.webs)
    before = metric(idle, "gateway_live_events_total")
    async with await open_stream(busy, token=token("hearer")) as stream:
        await asyncio.sleep(0.5)
        for n in range(50):
            await shared_gateway.produce({"user": "hearer", "data": n}, key=f"k{n}")
        await shared_gateway.produce({"broadcast": True, "data": "all"}, key="b")
        got = await _read_data(stream, 51)
        assert sorted(str(d) for _, d in got) == sorted([str(n) for n in range(50)] + ["all"])
    assert metric(busy, "gateway_live_events_total") >= 51
    assert metric(idle, "gateway_live_events_total") == before
    assert metric(idle, "gateway_live_sources") == 0


async def test_resume_is_exact_across_web_processes_consumers_and_twenty_instances(shared_gateway: Gateway) -> None:
    first, second = (web.url for web in shared_gateway.webs)
    instances = [f"resume-pi-{n}" for n in range(20)]
    await _grant("rita", instances)
    params = [("processInstanceUuid", p) for p in instances]
    sent: set[str] = set()
    counter = iter(range(10_000))

    async def produce_round(size: int) -> None:
        for _ in range(size):
            n = next(counter)
            kind = n % 5
            if kind == 0:
                envelope: dict[str, object] = {"broadcast": True, "data": f"b{n}"}
            elif kind == 1:
                envelope = {"user": "rita", "data": f"u{n}"}
            elif kind == 2:
                envelope = {"processInstanceUuid": instances[n % 20], "data": f"p{n}"}
            elif kind == 3:
                envelope = {"processInstanceUuid": instances[n % 20], "user": "rita", "data": f"pu{n}"}
            else:  # not for rita: another user's, and an instance she does not follow
                envelope = {"user": "someone-else", "data": f"x{n}"}
            if kind != 4:
                sent.add(str(envelope["data"]))
            await shared_gateway.produce(envelope)

    received: list[str] = []
    last_id = None
    for round_number in range(4):
        web = (first, second)[round_number % 2]
        options: dict[str, Any] = {"headers": {"Last-Event-ID": last_id}} if last_id else {}
        stream = await open_stream(web, token=token("rita"), params=params, **options)
        assert stream.status == 200
        before = len(sent)
        await produce_round(40)
        # Everything sent so far that this stream has not had arrives, each once.
        got = await _read_data(stream, len(sent) - len(received))
        received += [str(d) for _, d in got]
        last_id = got[-1][0]
        assert last_id is not None
        # Events produced while no stream is open are replayed on the next one.
        await stream.close()
        await produce_round(25)
        assert len(sent) > before
    final = await open_stream(second, token=token("rita"), params=params, headers={"Last-Event-ID": last_id or ""})
    got = await _read_data(final, len(sent) - len(received))
    received += [str(d) for _, d in got]
    await final.close()
    assert len(received) == len(set(received)), "an event came twice"
    assert set(received) == sent, "an event went missing"


async def test_a_resume_on_a_web_process_that_is_behind_repeats_nothing(shared_gateway: Gateway) -> None:
    ahead, behind = shared_gateway.webs
    # A stream of vic on the process that will fall behind keeps it subscribed to vic's events.
    keeper = await open_stream(behind.url, token=token("vic"))
    leaving = await open_stream(ahead.url, token=token("vic"))
    try:
        await asyncio.sleep(0.3)
        behind.proc.signal(signal.SIGSTOP)  # events published now wait in its socket, unread
        try:
            for n in range(30):
                await shared_gateway.produce({"user": "vic", "data": n}, key="vic")
            got = await _read_data(leaving, 30)
            last_id = got[-1][0]
            resumed_task = asyncio.create_task(
                open_stream(behind.url, token=token("vic"), headers={"Last-Event-ID": last_id or ""})
            )
            await asyncio.sleep(0.2)
        finally:
            behind.proc.signal(signal.SIGCONT)
        resumed = await resumed_task
        await shared_gateway.produce({"user": "vic", "data": "after"}, key="vic")
        [(_, data)] = await _read_data(resumed, 1)
        assert data == "after", "the process that was behind repeated what the client already had"
        assert [d for _, d in await _read_data(keeper, 31)] == [*range(30), "after"]
        await resumed.close()
    finally:
        await keeper.close()
        await leaving.close()


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers(3) as servers:
        yield servers


@pytest.fixture
async def cluster_gateway(kafka: KafkaBroker, cluster: RedisClusterServers, db_url: str) -> AsyncIterator[Gateway]:
    layout = Layout(webs=2, consumers=1, partitions=3, env={"REDIS_CLUSTER": "true", "EVENTS_STORE_SHARDS": "8"})
    async with running(bootstrap=kafka.bootstrap, redis_url=cluster.url, database_url=db_url, layout=layout) as gw:
        yield gw


async def test_the_gateway_runs_on_a_redis_cluster(cluster_gateway: Gateway) -> None:
    first, second = (web.url for web in cluster_gateway.webs)
    await _grant("cleo", ["cluster-pi"])
    params = [("processInstanceUuid", "cluster-pi")]
    one = await open_stream(first, token=token("cleo"), params=params)
    two = await open_stream(second, token=token("dora"))
    try:
        await asyncio.sleep(0.3)
        await cluster_gateway.produce({"user": "cleo", "data": "u1"})
        await cluster_gateway.produce({"processInstanceUuid": "cluster-pi", "data": "p1"})
        await cluster_gateway.produce({"broadcast": True, "data": "b1"})
        await cluster_gateway.produce({"user": "dora", "data": "d1"})
        got_one = await _read_data(one, 3)
        assert sorted(str(d) for _, d in got_one) == ["b1", "p1", "u1"]
        assert sorted(str(d) for _, d in await _read_data(two, 2)) == ["b1", "d1"]
        last_id = got_one[-1][0] or ""
        assert last_id.startswith("v1_")
        assert len(last_id) < 1024
        assert re.fullmatch(r"[A-Za-z0-9._~-]+", last_id)
    finally:
        await one.close()
        await two.close()
    # Resume on the other web process from the vector id: exactly what came after.
    await cluster_gateway.produce({"user": "cleo", "data": "u2"})
    await cluster_gateway.produce({"broadcast": True, "data": "b2"})
    async with await open_stream(second, token=token("cleo"), params=params, headers={"Last-Event-ID": last_id}) as r:
        assert sorted(str(d) for _, d in await _read_data(r, 2)) == ["b2", "u2"]
        with contextlib.suppress(TimeoutError):
            extra = await r.next_event(timeout=1)
            assert extra is None or extra.event != "message", f"unexpected {extra}"

    async def ready() -> bool:
        return (await http_get(first + "/readyz", timeout=5))[0] == 200

    await wait_until(ready, timeout=10, what="readiness on a cluster")


async def test_since_replays_from_a_time_then_goes_live(shared_gateway: Gateway) -> None:
    web = shared_gateway.webs[0].url
    async with await open_stream(web, token=token("tess")) as watcher:
        for n in range(3):
            await shared_gateway.produce({"user": "tess", "data": f"old{n}"}, key="tess")
        await watcher.events(3, timeout=30)
        await asyncio.sleep(0.05)
        since = datetime.now(UTC)
        await asyncio.sleep(0.05)
        for n in range(3):
            await shared_gateway.produce({"user": "tess", "data": f"new{n}"}, key="tess")
        await watcher.events(3, timeout=30)
    iso = since.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    expected = ["new0", "new1", "new2"]
    for value in (iso, str(int(since.timestamp() * 1000))):
        async with await open_stream(web, token=token("tess"), params=[("since", value)]) as stream:
            assert stream.status == 200
            assert [d for _, d in await _read_data(stream, len(expected))] == expected
            await shared_gateway.produce({"user": "tess", "data": f"live-{value}"}, key="tess")
            assert [d for _, d in await _read_data(stream, 1)] == [f"live-{value}"]
            expected.append(f"live-{value}")
