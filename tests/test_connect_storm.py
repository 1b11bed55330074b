"""A web process killed (SIGKILL) under 200 streams, half of them on session cookies: every stream reconnects
to the other web process within a second with Last-Event-ID, resumes exactly (every event it may see, once,
in order, none missing), no reconnect gets a 5xx, and the surviving process looks each user up at most once
rather than once per stream (sessions come from Redis, accounts from its cache).

The scenario is tests/storm.py, which bench/workloads/e_reconnect_storm.py runs at 1,000 streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psutil
import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client

from scripts.embedded import KafkaBroker, RedisServer
from tests.harness import Gateway, Layout, running, token
from tests.sse_client import open_stream
from tests.storm import Plan, run_storm

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.incidental_db, pytest.mark.slow]

# 4 streams per user: with the killed process's slots still held (they expire after the hub's slot TTL),
# a user's streams coming back stay within EVENTS_MAX_STREAMS_PER_USER (10).
PLAN = Plan(streams=200, users=50, prefix="storm-test")


@pytest_asyncio.fixture
async def two_webs(kafka: KafkaBroker, redis_server: RedisServer, db_url: str) -> AsyncIterator[Gateway]:
    async with running(
        bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url, layout=Layout(webs=2)
    ) as gateway:
        yield gateway


def _sessions(plan: Plan) -> dict[str, str]:
    """A logged-in session for each user the plan puts on a session cookie."""
    sessions = {}
    for i in range(plan.users):
        if plan.on_session(i):
            user, _ = get_user_model().objects.get_or_create(username=plan.user(i))
            client = Client()
            client.force_login(user)
            sessions[user.get_username()] = client.cookies["sessionid"].value
    return sessions


async def test_streams_of_a_killed_web_process_resume_exactly_on_the_other(two_webs: Gateway) -> None:
    sessions = await sync_to_async(_sessions)(PLAN)
    out = await run_storm(two_webs, PLAN, sessions, timeout=120)

    assert out["reconnected"] == PLAN.streams, out
    assert out["statuses"] == {"200": 2 * PLAN.streams}, out  # the first connect and the reconnect, nothing else
    assert out["missing"] == 0, out["inexact_streams"]
    assert out["duplicated"] == 0, out["inexact_streams"]
    assert out["out_of_order_streams"] == 0, out["inexact_streams"]
    assert out["deliveries_received"] == out["deliveries_expected"] > 0
    # 100 streams came back on sessions and 100 on tokens: at most one query per user, not one per stream.
    assert out["survivor_queries"] <= PLAN.users, out


async def test_open_streams_hold_no_thread_of_their_own(gateway: Gateway) -> None:
    """The stream is a Django view, but served without the thread Django gives each request for its life."""
    web = psutil.Process(gateway.webs[0].proc.pid)
    warm = await open_stream(gateway.url, token=token("threads-warm"))  # the hub and executor threads start
    assert warm.status == 200
    assert await warm.next_block() is not None
    before = web.num_threads()
    streams = await asyncio.gather(*(open_stream(gateway.url, token=token(f"threads-{i % 20}")) for i in range(100)))
    try:
        assert [s.status for s in streams] == [200] * 100
        for stream in streams:
            assert await stream.next_block() is not None  # the stream's first block: it is open
        # The database executor may still grow to its few threads; a thread per stream would be 100 more.
        assert web.num_threads() - before < 10
    finally:
        await asyncio.gather(warm.close(), *(s.close() for s in streams))
