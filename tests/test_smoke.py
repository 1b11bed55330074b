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


async def test_a_stream_opened_on_an_empty_store_resumes_from_its_position(gateway: Gateway) -> None:
    async with await open_stream(gateway.url, token=token("early")) as stream:
        await stream.next_block()  # retry
        await stream.next_block()  # the position: nothing stored yet
        position = stream.last_event_id
    assert position == "0-0"
    await gateway.produce({"user": "early", "data": "while away"})
    async with await open_stream(gateway.url, token=token("early"), headers={"Last-Event-ID": position}) as again:
        event = await again.next_event(timeout=20)
    assert event is not None
    assert (event.event, event.json()["data"]) == ("message", "while away")
