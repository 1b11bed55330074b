"""Fixtures: a real Kafka-protocol broker (Tansu), a real Redis per test, the gateway's processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from django.db import connection

from scripts.embedded import KafkaBroker, RedisServer
from tests.harness import Gateway, database_url


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A Redis of the test's own: nothing carries over between tests."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def db_url(transactional_db: None) -> str:
    """The test database, committed to, so the gateway's own processes see what the test writes."""
    return database_url(connection.settings_dict)


@pytest_asyncio.fixture
async def gateway(kafka: KafkaBroker, redis_server: RedisServer, db_url: str) -> AsyncIterator[Gateway]:
    """One web process and one consumer on fresh topics."""
    gw = Gateway(bootstrap=kafka.bootstrap, redis_url=redis_server.url, database_url=db_url)
    await gw.create_topics()
    try:
        gw.start_web()
        gw.start_consumer()
        yield gw
    finally:
        gw.stop()
        await gw.close_producer()
