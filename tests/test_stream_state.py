"""The registry, and a stream's states (catching up, live, closed) driven in-process against a real Redis:
a real hub with its live feed and store, the stream's body read as a server would."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from events.core import positions, routing
from events.core.envelope import Event
from events.core.records import CloseReason, Record
from events.core.routing import Keyspace, Source
from events.delivery import feed as feed_module
from events.delivery.hub import Hub
from events.delivery.registry import Registry
from events.delivery.stream import Stream
from scripts.embedded import RedisServer


class _Reader:
    def __init__(self, *sources: Any) -> None:
        self.sources = set(sources)


def test_the_registry_subscribes_on_the_first_reader_and_unsubscribes_after_the_last() -> None:
    keys = Keyspace()
    first: list[Source] = []
    last: list[Source] = []
    registry = Registry(on_first=first.append, on_last=last.append)
    ana, broadcast, pi = keys.user_source("ana"), keys.broadcast_source(), keys.process_source("pi-1")
    a, b = _Reader(ana, broadcast, pi), _Reader(keys.user_source("bob"), broadcast)
    registry.add(a)
    registry.add(b)
    assert set(first) == {ana, broadcast, pi, keys.user_source("bob")}
    assert registry.readers_of(broadcast) == {a, b}
    registry.drop_source(a, pi)
    assert last == [pi]
    assert registry.readers_of(pi) == set()
    registry.remove(a)
    assert set(last) == {pi, ana}
    registry.remove(b)
    assert set(last) == {pi, ana, broadcast, keys.user_source("bob")}
    assert len(registry) == 0
    registry.remove(b)  # twice: nothing happens


@pytest.fixture
async def hub(settings: Any) -> AsyncIterator[Hub]:
    with RedisServer() as server:
        settings.REDIS_URL = server.url
        settings.EVENTS_STREAM_BUFFER = 20
        settings.EVENTS_SLOW_CLIENT_SECONDS = 1.0
        settings.EVENTS_HEARTBEAT_SECONDS = 3600
        settings.AUDIT_DELIVERIES = "off"
        hub = Hub()
        await hub.start()
        yield hub
        await hub.stop(grace=1)


_offsets = itertools.count()


def _record(n: int, *, user: str | None = "ana", pi: str | None = None, kind: str = "message") -> Record:
    event = Event(kind, "E" if kind == "message" else kind, user, pi, False, json.dumps(n), None)
    return Record("engine", 0, next(_offsets), int(time.time() * 1000), event)


def _stream(hub: Hub, **options: Any) -> Stream:
    defaults: dict[str, Any] = {
        "stream_id": str(uuid.uuid4()),
        "user": "ana",
        "followed": [],
        "auth_method": "bearer",
        "last_event_id": None,
        "expires_at": None,
        "client_address": "127.0.0.1",
        "user_agent": "test",
    }
    return Stream(hub=hub, **{**defaults, **options})


class _Client:
    """Reads a stream's body as fast as it comes (as a server writing to a fast socket would), parsing
    SSE blocks."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.body = stream.body()
        self.blocks: list[dict[str, str]] = []
        self.ended = False
        self._rest = b""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    def received(self, chunk: bytes) -> None:
        self._rest += chunk
        *complete, self._rest = self._rest.split(b"\n\n")
        for raw in complete:
            fields: dict[str, str] = {}
            for line in raw.decode().split("\n"):
                name, _, value = line.partition(": ")
                fields[name] = value
            self.blocks.append(fields)
        self._arrived.set()

    async def _pump(self) -> None:
        try:
            async for chunk in self.body:
                self.received(chunk)
        finally:
            self.ended = True
            self._arrived.set()

    async def read(self, *, until: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not until(self):
            assert not self.ended, "the stream ended"
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out; got {len(self.data())} events")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def data(self) -> list[Any]:
        return [json.loads(b["data"])["data"] for b in self.blocks if b.get("event") == "E"]

    def events(self, name: str) -> list[dict[str, str]]:
        return [b for b in self.blocks if b.get("event") == name]

    async def close(self) -> None:
        self.stream.close(CloseReason.CLIENT_GONE)
        await self._task


async def test_a_live_stream_gets_its_events_in_order_with_their_ids(hub: Hub) -> None:
    client = _Client(_stream(hub))
    await client.read(until=lambda c: c.blocks)  # retry and the starting position
    ids = await hub.store.append([_record(n) for n in range(5)] + [_record(99, user="bob")])
    await client.read(until=lambda c: len(c.data()) >= 5)
    assert client.data() == [0, 1, 2, 3, 4]
    assert [b["id"] for b in client.events("E")] == ids[:5]
    await client.close()


class _Socket:
    """What the server adapter's send_now does, as a stream sees it: writes a piece at once, or refuses
    (something is queued before it) every `refuse_every`-th time."""

    def __init__(self, refuse_every: int = 0) -> None:
        self.client: _Client | None = None
        self.refuse_every = refuse_every
        self.offered = 0
        self.written = 0

    def send_now(self, chunk: bytes) -> bool:
        self.offered += 1
        if self.refuse_every < 0 and self.offered == 5:
            raise RuntimeError("the server adapter broke")
        if self.client is None or (self.refuse_every > 0 and self.offered % self.refuse_every == 0):
            return False
        self.written += 1
        self.client.received(chunk)
        return True


@pytest.mark.parametrize("refuse_every", [0, 3, -1])  # -1: the adapter raises once, then is not asked again
async def test_live_events_written_straight_to_the_socket_keep_their_order_and_ids(hub: Hub, refuse_every: int) -> None:
    socket = _Socket(refuse_every)
    stream = _stream(hub, send_now=socket.send_now)
    client = _Client(stream)
    socket.client = client
    await client.read(until=lambda c: c.blocks)
    ids: list[str] = []
    for start in range(0, 200, 10):
        ids += await hub.store.append([_record(n) for n in range(start, start + 10)] + [_record(-1, user="bob")])
        await asyncio.sleep(0.01)
    await client.read(until=lambda c: len(c.data()) >= 200)
    assert client.data() == list(range(200))
    assert [b["id"] for b in client.events("E")] == [i for n, i in enumerate(ids) if n % 11 != 10]
    assert socket.written > 0  # the direct path was taken (the body was waiting between batches)
    if refuse_every > 0:
        assert socket.written < socket.offered  # and refusals went through the window, in order
    if refuse_every < 0:
        assert socket.offered == 5  # the body wrote the rest
    assert stream.delivered == 200
    await client.close()


async def test_a_burst_far_beyond_the_window_reaches_a_reading_client_whole(hub: Hub) -> None:
    client = _Client(_stream(hub))
    await client.read(until=lambda c: c.blocks)
    for start in range(0, 3000, 500):
        await hub.store.append([_record(n) for n in range(start, start + 500)])
    await client.read(until=lambda c: len(c.data()) >= 3000)
    assert client.data() == list(range(3000))
    assert client.stream.catch_ups >= 1  # the window (20 events) overflowed and the store filled in
    assert client.stream.live
    await client.close()


async def test_resuming_replays_exactly_what_was_missed_then_goes_live(hub: Hub) -> None:
    ids = await hub.store.append([_record(n) for n in range(300)])
    client = _Client(_stream(hub, last_event_id=ids[99]))
    await client.read(until=lambda c: len(c.data()) >= 200)
    await hub.store.append([_record(300)])
    await client.read(until=lambda c: len(c.data()) >= 201)
    assert client.data() == list(range(100, 301))
    await client.close()


async def test_resuming_from_a_position_this_process_has_not_reached_does_not_repeat(hub: Hub) -> None:
    # A client that left a process ahead of this one: its id is stored but the feed here has not handed it
    # out yet (simulated: the feed's head is moved back). Nothing up to that id comes again.
    ids = await hub.store.append([_record(n) for n in range(10)])
    hub.feed.head = [positions.ZERO]
    client = _Client(_stream(hub, last_event_id=ids[-1]))
    await client.read(until=lambda c: c.blocks)
    await hub.store.append([_record(10)])
    await client.read(until=lambda c: len(c.data()) >= 1)
    assert client.data() == [10]
    await client.close()


@pytest.mark.parametrize(
    ("last_event_id", "reason"),
    [("not-an-id", "unknown-id"), ("99999999999999-0", "not-yet-issued"), ("1-0", "expired")],
)
async def test_a_position_that_cannot_resume_gets_a_reset_with_its_reason(
    hub: Hub, last_event_id: str, reason: str
) -> None:
    await hub.store.append([_record(n) for n in range(3)])
    client = _Client(_stream(hub, last_event_id=last_event_id))
    await client.read(until=lambda c: c.events("stream-reset"))
    data = json.loads(client.events("stream-reset")[0]["data"])
    assert data["reason"] == reason
    assert data["oldest"].endswith("Z")
    assert client.data() == []
    await client.close()


async def test_since_replays_from_that_time(hub: Hub) -> None:
    await hub.store.append([_record(n) for n in range(3)])
    await asyncio.sleep(0.01)
    since = int(time.time() * 1000)
    await asyncio.sleep(0.01)
    await hub.store.append([_record(n) for n in range(3, 6)])
    client = _Client(_stream(hub, since_ms=since))
    await client.read(until=lambda c: len(c.data()) >= 3)
    assert client.data() == [3, 4, 5]
    await client.close()


async def test_a_disconnect_ends_following_that_instance_live_and_in_replay(hub: Hub) -> None:
    before = await hub.store.append([_record(1, pi="pi-1"), _record(0, pi="pi-1", kind="disconnect")])
    replaying = _Client(_stream(hub, followed=["pi-1"], last_event_id="0-0"))
    live = _Client(_stream(hub, followed=["pi-1"]))
    await live.read(until=lambda c: c.blocks)
    await hub.store.append([_record(2, pi="pi-1"), _record(0, pi="pi-1", kind="disconnect"), _record(3, pi="pi-1")])
    await hub.store.append([_record(4)])
    await live.read(until=lambda c: len(c.data()) >= 2)
    assert live.data() == [2, 4]
    assert len(live.events("unsubscribed")) == 1
    await replaying.read(until=lambda c: 4 in c.data())
    assert replaying.data() == [1, 4]
    assert replaying.events("unsubscribed")[0]["id"] == before[1]
    await asyncio.sleep(0.2)
    assert hub.store.keys.process_source("pi-1") not in hub.registry.sources()
    await live.close()
    await replaying.close()


async def test_a_client_that_stops_reading_is_closed_and_holds_bounded_memory(hub: Hub) -> None:
    unread = [0]
    stream = _stream(hub, write_buffer=lambda: unread[0])
    body = stream.body()
    await anext(body)
    unread[0] = 10_000_000  # the socket stops draining
    reading = asyncio.get_running_loop().create_task(_drain_body(body))
    for start in range(0, 2000, 10):  # batches smaller than the window
        await hub.store.append([_record(n) for n in range(start, start + 10)])
        assert len(stream._window) <= 21
    await asyncio.wait_for(reading, 20)
    assert stream._close_reason == CloseReason.SLOW_CLIENT
    assert stream not in hub.registry


async def _drain_body(body: Any) -> None:
    async for _ in body:
        pass


@pytest.fixture
async def own_redis(settings: Any) -> AsyncIterator[tuple[RedisServer, Hub, _Client]]:
    """A Redis of the test's own (to stop, restart or freeze), a hub on it, and a live client that got event 1."""
    server = RedisServer().start()
    try:
        settings.REDIS_URL = server.url
        settings.AUDIT_DELIVERIES = "off"
        hub = Hub()
        await hub.start()
        client = _Client(_stream(hub))
        await client.read(until=lambda c: c.blocks)
        await hub.store.append([_record(1)])
        await client.read(until=lambda c: len(c.data()) >= 1)
        yield server, hub, client
        await client.close()
        await hub.stop(grace=1)
    finally:
        server.stop()


async def test_after_redis_restarts_a_stream_goes_on_with_what_is_stored_next(
    own_redis: tuple[RedisServer, Hub, _Client],
) -> None:
    server, hub, client = own_redis
    server.stop()
    await asyncio.sleep(4)  # long enough for several reconnect attempts to fail
    server.start()  # empty: what it held is gone, ids start again from the clock

    async def delivered_after_restart() -> bool:
        await hub.store.append([_record(2)])
        with contextlib.suppress(TimeoutError):
            await client.read(until=lambda c: 2 in c.data(), timeout=1)
        return 2 in client.data()

    deadline = time.monotonic() + 30
    while not await delivered_after_restart():
        assert time.monotonic() < deadline, "the stream got nothing after Redis came back"
    assert client.data()[0] == 1


@pytest.fixture
def quick_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed_module, "QUIET_SECONDS", 0.5)


async def test_a_subscriber_connection_that_goes_silent_is_noticed_and_replaced(
    quick_quiet: None, own_redis: tuple[RedisServer, Hub, _Client]
) -> None:
    # Redis frozen (SIGSTOP): the connection stays open but nothing answers. The feed must notice (readiness
    # says so) instead of waiting forever, and once Redis answers again the stream goes on, exactly.
    server, hub, client = own_redis
    assert hub.healthy
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while hub.healthy:
            assert time.monotonic() < deadline, "a silent subscriber connection went unnoticed"
            await asyncio.sleep(0.1)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    await hub.store.append([_record(2), _record(3)])
    await client.read(until=lambda c: len(c.data()) >= 3, timeout=30)
    assert client.data() == [1, 2, 3]
    deadline = time.monotonic() + 30
    while not hub.healthy:
        assert time.monotonic() < deadline, "the feed did not reconnect"
        await asyncio.sleep(0.1)


async def test_a_source_no_stream_reads_is_unsubscribed_after_a_grace(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed_module, "UNSUBSCRIBE_AFTER_SECONDS", 0.3)
    channel = hub.store.keys.user_source("ana").key

    async def subscribers() -> int:
        [(_, count)] = await hub.redis.pubsub_numsub(channel)
        return int(count)

    first = _Client(_stream(hub))
    await first.read(until=lambda c: c.blocks)
    assert await subscribers() == 1
    await first.close()
    again = _Client(_stream(hub))  # a reconnect at once finds the source live
    await again.read(until=lambda c: c.blocks)
    await hub.store.append([_record(7)])
    await again.read(until=lambda c: c.data() == [7])
    await again.close()
    deadline = time.monotonic() + 10
    while await subscribers():
        assert time.monotonic() < deadline, "the source stayed subscribed"
        await asyncio.sleep(0.1)


async def test_streams_opening_together_share_one_read_of_the_heads_taken_after_they_asked(hub: Hub) -> None:
    reads = 0
    read = hub.store.heads

    async def counted() -> Any:
        nonlocal reads
        reads += 1
        return await read()

    hub.store.heads = counted  # type: ignore[method-assign]
    [event_id] = await hub.store.append([_record(1)])
    together = await asyncio.gather(*(hub.fresh_heads() for _ in range(50)))
    assert reads == 1
    assert set(together) == {(positions.parse_redis_id(event_id),)}
    [later_id] = await hub.store.append([_record(2)])
    assert await hub.fresh_heads() == (positions.parse_redis_id(later_id),)
    assert reads == 2


async def test_streams_opening_together_claim_their_slots_in_one_call_and_each_user_keeps_to_the_maximum(
    hub: Hub, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.EVENTS_MAX_STREAMS_PER_USER = 3
    calls: list[int] = []
    claim_many = hub._claim_many

    async def counted(**kwargs: Any) -> Any:
        calls.append(len(kwargs["keys"]) // 2)
        return await claim_many(**kwargs)

    monkeypatch.setattr(hub, "_claim_many", counted)
    ends = time.time() + 600
    anas = [f"ana-{i}" for i in range(5)]  # bearer streams: each keeps its end
    bobs = ["bob-0", "bob-1"]  # session streams: no end
    granted = await asyncio.gather(
        *(hub.claim_slot("ana", stream_id, ends) for stream_id in anas),
        *(hub.claim_slot("bob", stream_id) for stream_id in bobs),
    )
    assert granted == [True, True, True, False, False, True, True]
    assert calls == [7]
    assert await hub.redis.zrange(routing.STREAMS_OF_USER_PREFIX + "ana", 0, -1) == [b"ana-0", b"ana-1", b"ana-2"]
    assert await hub.redis.zcard(routing.STREAMS_OF_USER_PREFIX + "bob") == 2
    assert await hub.redis.get(routing.stream_expiry_key("ana-2")) == repr(ends).encode()
    assert 0 < await hub.redis.ttl(routing.stream_expiry_key("ana-2")) <= 600 + 60
    assert await hub.redis.get(routing.stream_expiry_key("ana-3")) is None  # refused: nothing kept
    assert await hub.redis.get(routing.stream_expiry_key("bob-0")) is None
    # Later, alone: the same limits.
    assert not await hub.claim_slot("ana", "ana-5", ends)
    assert await hub.claim_slot("bob", "bob-2")
    assert calls == [7, 1, 1]


async def test_claims_made_while_redis_is_down_fail_every_one_and_work_again_once_it_is_back(
    own_redis: tuple[RedisServer, Hub, _Client],
) -> None:
    server, hub, _ = own_redis
    server.stop()
    outcomes = await asyncio.gather(*(hub.claim_slot(f"user-{i}", f"s-{i}") for i in range(5)), return_exceptions=True)
    assert all(isinstance(outcome, redis.RedisError | OSError) for outcome in outcomes), outcomes
    server.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert await asyncio.gather(*(hub.claim_slot(f"user-{i}", f"t-{i}") for i in range(5))) == [True] * 5
            break
        except (redis.RedisError, OSError):
            assert time.monotonic() < deadline, "claims kept failing after Redis came back"
            await asyncio.sleep(0.2)
