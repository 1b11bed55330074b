"""The event store against a real Redis and a real Redis Cluster; positions and the opaque ids they become."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster

from events.core import positions
from events.core.envelope import Event
from events.core.records import Record
from events.core.routing import Keyspace
from events.core.store import EventStore
from scripts.embedded import RedisClusterServers, RedisServer

_ids = st.tuples(st.integers(0, 10**15 - 1), st.integers(0, positions.MAX_SEQ))


@given(st.integers(1, 64).flatmap(lambda n: st.lists(_ids, min_size=n, max_size=n)))
def test_a_position_survives_its_id_and_the_id_is_url_safe_and_short(position: list[tuple[int, int]]) -> None:
    encoded = positions.encode(tuple(position))
    assert positions.decode(encoded, len(position)) == tuple(position)
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", encoded)
    assert len(encoded) < 1024


@given(st.text(max_size=200))
def test_any_text_either_names_a_position_or_is_refused(text: str) -> None:
    for shards in (1, 16):
        decoded = positions.decode(text, shards)
        assert decoded is None or positions.decode(positions.encode(decoded), shards) == decoded


def test_ids_of_one_shard_count_are_not_taken_for_another() -> None:
    vector = positions.encode(((1, 2),) * 16)
    assert positions.decode(vector, 8) is None
    assert positions.decode(vector, 1) is None
    assert positions.decode("1700000000000-0", 16) is None
    assert positions.decode("\u0661\u0667\u0660\u0660-0", 1) is None  # other scripts' digits
    assert positions.parse_event_id("3.1700000000000-4", 16) == (3, (1700000000000, 4))
    assert positions.parse_event_id("16.1700000000000-4", 16) is None
    assert positions.parse_event_id("3.1700000000000-4", 1) is None


@pytest.fixture(params=["single", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EventStore]:
    if request.param == "single":
        with RedisServer() as server:
            client: Any = aioredis.from_url(server.url)
            yield EventStore(client, retention_seconds=3600)
            await client.aclose()
    else:
        with RedisClusterServers(3) as cluster:
            client = RedisCluster.from_url(cluster.url)
            await client.initialize()
            yield EventStore(client, retention_seconds=3600, keyspace=Keyspace(shards=16, cluster=True))
            await client.aclose()


def _message(n: int, *, user: str | None = None, pi: str | None = None, broadcast: bool = False) -> Record:
    return Record("engine", 0, n, 1_700_000_000_000 + n, Event("message", "E", user, pi, broadcast, str(n), None))


async def test_each_event_is_published_on_its_source_in_the_step_that_stores_it(store: EventStore) -> None:
    source = store.keys.user_source("ana")
    if store.keys.cluster:
        pubsub = store.redis.get_node_from_key(source.key)
        subscriber = aioredis.Redis(host=pubsub.host, port=int(pubsub.port)).pubsub()
        command, kind = "SSUBSCRIBE", b"smessage"
    else:
        subscriber = store.redis.pubsub()
        command, kind = "SUBSCRIBE", b"message"
    await subscriber.connect()
    await subscriber.execute_command(command, source.key)
    assert (await subscriber.parse_response(block=True))[0] in (b"subscribe", b"ssubscribe")
    [event_id] = await store.append([_message(1, user="ana")])
    await store.append([_message(2, user="bob")])
    response = await asyncio.wait_for(subscriber.parse_response(block=True), 10)
    assert response[0] == kind
    live = store.decode_live(source, response[2])
    assert live is not None
    assert (live.id, live.user, live.data_json) == (event_id, "ana", "1")
    assert positions.parse_event_id(event_id, store.shards) == (source.shard, live.place)
    await subscriber.aclose()


async def test_a_paged_replay_is_every_event_of_the_sources_once_in_order(store: EventStore) -> None:
    records = []
    for n in range(600):
        kind = n % 4
        records.append(
            _message(
                n,
                user="ana" if kind == 0 else ("bob" if kind == 1 else None),
                pi=f"pi-{n % 5}" if kind == 2 else None,
                broadcast=kind == 3,
            )
        )
    ids = await store.append(records)
    assert all(ids)
    heads = await store.heads()
    sources = store.keys.sources_for(user="ana", process_instances=["pi-0", "pi-2"])
    pages = [
        page
        async for page in store.replay_pages(
            sources=sources, after=(positions.ZERO,) * store.shards, until=heads, page=7
        )
    ]
    assert all(len(page) <= 7 for page in pages)
    replayed = [event.data_json for page in pages for event in page]
    expected = [str(n) for n in range(600) if n % 4 == 0 or n % 4 == 3 or (n % 4 == 2 and n % 5 in (0, 2))]
    assert sorted(replayed, key=int) == expected
    assert len(set(replayed)) == len(replayed)
    # Within a shard, in id order (on a single Redis: one total order).
    for shard in range(store.shards):
        places = [event.place for page in pages for event in page if event.shard == shard]
        assert places == sorted(places)
    # From a position in the middle: exactly what came after it.
    middle = ids[300]
    parsed = positions.parse_event_id(middle, store.shards)
    assert parsed is not None
    if store.shards == 1:
        rest = await store.replay(sources=sources, after=(parsed[1],), until=heads)
        assert [e.data_json for e in rest] == [n for n in expected if int(n) > 300]


async def test_resume_problems_name_the_reason(store: EventStore) -> None:
    zero = (positions.ZERO,) * store.shards
    assert await store.resume_problem(zero) is None  # an empty store: nothing was trimmed
    await store.append([_message(n, user="ana") for n in range(3)])
    heads = await store.heads()
    assert await store.resume_problem(heads) is None
    future = tuple((ms + 60_000, 0) for ms, _ in heads)
    assert await store.resume_problem(future) == "not-yet-issued"
    # An old position whose successors may have been trimmed (the oldest entry held comes after it).
    ancient = tuple((1, 0) if place != positions.ZERO else place for place in heads)
    assert await store.resume_problem(ancient) == "expired"


async def test_offsets_and_producer_ids_count_across_shards(store: EventStore) -> None:
    event = Event("message", "E", "ana", None, False, "1", "producer-1")
    first = await store.append([Record("engine", 2, 10, 1, event)])
    again = await store.append([Record("engine", 2, 11, 1, event)])
    assert first[0] not in ("", "dup")
    assert again == ["dup"]
    assert await store.append([Record("engine", 2, 10, 1, event)]) == [""]  # that offset is stored
    assert await store.stored_offsets([("engine", 2), ("engine", 3)]) == {("engine", 2): 11, ("engine", 3): -1}
    assert await store.seen_producer_ids([event]) == {"producer-1"}
    entry = await store.entry(first[0])
    assert entry is not None
    assert entry["user"] == "ana"


async def test_on_a_cluster_the_shards_spread_over_the_masters() -> None:
    with RedisClusterServers(3) as cluster:
        client = RedisCluster.from_url(cluster.url)
        await client.initialize()
        keys = Keyspace(shards=16, cluster=True)
        nodes = {getattr(client.get_node_from_key(keys.events_stream(k)), "name", None) for k in range(16)}
        # Every key of a shard shares its hash slot.
        for k in range(16):
            slots = {
                client.keyslot(key)
                for key in (
                    keys.events_stream(k),
                    keys.last_id_key(k),
                    keys.dedup_key(k, "p"),
                    keys.offset_key(k, "t", 0),
                )
            }
            assert len(slots) == 1
        assert len(nodes) == 3
        await client.aclose()
