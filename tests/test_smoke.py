"""The thinnest end-to-end path: a record produced to the broker reaches an SSE client of the running app."""

import pytest

from tests.harness import Gateway, token
from tests.sse_client import open_stream

pytestmark = pytest.mark.django_db(transaction=True)


async def test_record_produced_to_kafka_reaches_sse_client(gateway: Gateway) -> None:
    async with await open_stream(gateway.url, token=token("alice")) as stream:
        assert stream.status == 200
        await gateway.produce({"user": "alice", "event": "Data", "data": {"x": 1}})
        event = await stream.next_event(timeout=20)
    assert event is not None
    assert event.event == "Data"
    body = event.json()
    assert body["data"] == {"x": 1}
    assert body["user"] == "alice"
    assert body["broadcast"] is False
    assert body["processInstanceUuid"] is None
    assert event.id
