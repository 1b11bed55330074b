"""Fixtures: a real Kafka-protocol broker (Tansu), a real Redis per test, the gateway's processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from django.db import connection

from scripts.embedded import KafkaBroker, RedisServer
from tests.harness import Gateway, database_url, running


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A Redis of the test's own: nothing carries over between tests."""
    with RedisServer() as server:
        yield server


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
def shared_gateway(kafka: KafkaBroker, db_url: str) -> Iterator[Gateway]:
    """One deployment shared by a module's tests, which keep apart by using their own users."""
    with RedisServer() as server:
        gw = Gateway(bootstrap=kafka.bootstrap, redis_url=server.url, database_url=db_url)
        asyncio.run(gw.create_topics())
        try:
            gw.start_web()
            gw.start_consumer()
            yield gw
        finally:
            gw.stop()
