"""Fixtures: a real Kafka-protocol broker (Tansu), a real Redis per test, the gateway's processes, Chromium.

Two ways to get a deployment (tests/harness.py starts both): `gateway`, a fresh one for one test, and
`shared_gateway`, one per module, which a module shapes by overriding `shared_layout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from asgiref.sync import SyncToAsync
from django.db import connection, connections
from playwright.async_api import Browser, async_playwright

from scripts.embedded import KafkaBroker, RedisClusterServers, RedisServer
from tests.harness import Gateway, Layout, database_url, deployed, running


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A Redis of the test's own: nothing carries over between tests."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def _async_orm_connections_closed(django_db_setup: None) -> Iterator[None]:
    """Async tests' ORM calls (`acreate`, `afirst`, sync_to_async) run on asgiref's one sync thread, whose
    database connection pytest-django never sees: closed before the test database is dropped, which
    PostgreSQL refuses while a session is connected."""
    yield
    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


@pytest.fixture(scope="session")
def db_url(django_db_setup: None) -> str:
    """The test database, for the gateway's own processes. Tests that write what those processes
    must see use `django_db(transaction=True)`, so it is committed."""
    return database_url(connection.settings_dict)


@pytest_asyncio.fixture
async def gateway(kafka: KafkaBroker, redis_server: RedisServer, db_url: str) -> AsyncIterator[Gateway]:
    """A fresh deployment for one test: one web process and one consumer on new topics, its own Redis."""
    async with running(bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url) as gw:
        yield gw


@pytest.fixture(scope="module")
def shared_layout() -> Layout:
    """The processes and settings of a module's shared deployment; a module overrides this to change them."""
    return Layout()


@pytest.fixture(scope="module")
def module_gateway(kafka: KafkaBroker, db_url: str, shared_layout: Layout) -> Iterator[Gateway]:
    """One deployment shared by a module's tests, which keep apart by using their own users; its own Redis."""
    with (
        RedisServer() as server,
        deployed(bootstrap=kafka.bootstrap, redis_url=server.url, database_url=db_url, layout=shared_layout) as gw,
    ):
        yield gw


@pytest_asyncio.fixture
async def shared_gateway(module_gateway: Gateway) -> AsyncIterator[Gateway]:
    """The module's deployment, for one test: the producer a test starts belongs to that test's event loop."""
    yield module_gateway
    await module_gateway.close_producer()


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; scripts/system-packages installs it
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root in a container
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    if not await asyncio.to_thread(CHROMIUM.exists):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-packages as root (apt-get install chromium)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of three masters of the test's own."""
    with RedisClusterServers(3) as cluster:
        yield cluster
