"""Whatever a producer writes is either stored and deliverable, or rejected with a reason.

Property-based (Hypothesis): records are generated from the classes of hostile input (deep nesting,
numbers JSON cannot carry, lone surrogates, control characters, oversize and wrongly typed fields,
duplicate keys, empty values, odd timestamps); each one is parsed, stored in a real Redis, read back and
rendered as the web process would, and the frame is checked the way a browser reads it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.core import envelope, positions, sse
from events.core.envelope import MAX_CLOCK_SKEW_MS, InvalidRecord, Rejection, parse, published_ms
from events.core.records import Record
from events.core.routing import Keyspace, Source
from events.core.store import EventStore
from events.delivery.stream import render
from scripts.embedded import RedisServer

MAX_BYTES = 64 * 1024

# Characters of every kind, lone surrogates and controls included.
anything = st.characters(codec=None, categories=None)
hostile_text = st.one_of(
    st.text(anything, max_size=40),
    st.sampled_from(["", " ", "\x00", "\ud800", "\udfff", "a\nb", "\r\n", "\u2028", "x" * 300, "é", "a:b", "ok"]),
)
valid_names = st.sampled_from(["Notification", "ProcessMetadata", "a.b:c-d_e", "message"])
# Integers past Python's digit limit are written into the value as text (raw_values): Hypothesis itself
# cannot print them.
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(
    st.none() | st.booleans() | numbers | hostile_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=12,
)
maybe = st.one_of(st.none(), json_values)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    candidates = {
        "type": st.sampled_from([None, "", "message", "connect", "disconnect", "shout", 3, [], {}]),
        "event": valid_names | hostile_text | maybe,
        "user": st.sampled_from(["ana", "bob"]) | hostile_text | maybe,
        "processInstanceUuid": st.sampled_from(["pi-1", "pi-2"]) | hostile_text | maybe,
        "broadcast": st.booleans() | maybe,
        "id": st.uuids().map(str) | hostile_text | maybe,
        "data": json_values,
    }
    for key, strategy in candidates.items():
        if draw(st.booleans()):
            fields[key] = draw(strategy)
    return fields


def _encode(value: dict[str, Any], ascii_only: bool) -> bytes:
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


def _deep(depth: int) -> bytes:
    return b'{"user":"ana","data":' + b"[" * depth + b"]" * depth + b"}"


raw_values = st.one_of(
    st.builds(_encode, envelopes(), st.booleans()),
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n),
    st.integers(min_value=50, max_value=2_000).map(_deep),
    st.integers(min_value=4_000, max_value=20_000).map(lambda n: b'{"user":"ana","data":' + b"7" * n + b"}"),
    st.sampled_from(
        [
            b'{"user":"ana","data":NaN}',
            b'{"user":"ana","data":[Infinity]}',
            b'{"user":"ana","data":-Infinity}',
            b'{"user":"ana","data":1e999}',
            b'{"user":"ana","user":"bob","data":1}',
            b'{"user":"ana","data":{"a":1,"a":2}}',
            b'{"user":"ana","data":"\\ud800"}',
            b'{"user":"ana","data":{"\\udfff":1}}',
            b'{"user":"ana\\u0000","data":1}',
            b'{"user":"ana","id":"\\ud800","data":1}',
            b'{"user":"ana","event":"\\u0000","data":1}',
            b'{"user":"ana","data":"\\u0000\\u001f\\r\\n"}',
            b"null",
            b"",
            b"\x00",
            b'"\xff"',
        ]
    ),
)
timestamps = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([-1, 0, int(time.time() * 1000), int(time.time() * 1_000_000)]),
)


class _Store:
    """One Redis and one event loop for all of Hypothesis's examples."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = aioredis.from_url(url)
        self.store = EventStore(self.client, retention_seconds=3600)
        self.offsets = itertools.count()
        self.producer_ids: set[str] = set()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def store() -> Iterator[_Store]:
    with RedisServer() as server:
        held = _Store(server.url)
        try:
            yield held
        finally:
            held.close()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(value=raw_values, timestamp=timestamps)
def test_parse_store_render_never_raises_and_every_rejection_has_a_reason(
    store: _Store, value: bytes, timestamp: int
) -> None:
    rejection: InvalidRecord | None = None
    try:
        event = parse(value, max_bytes=MAX_BYTES)
    except InvalidRecord as exc:
        rejection = exc
    if rejection is not None:
        assert isinstance(rejection.reason, Rejection)
        assert rejection.detail
        # What goes into the dead-letter header is text any Kafka client reads.
        str(rejection).encode("utf-8")
        return
    received = int(time.time() * 1000)
    published = published_ms(timestamp, received_ms=received)
    assert 0 <= published <= received + MAX_CLOCK_SKEW_MS

    offset = next(store.offsets)
    [event_id] = store.run(store.store.append([Record("hostile", 0, offset, published, event)]))
    if event.producer_id in store.producer_ids:
        assert event_id == "dup"  # Hypothesis repeated a producer id: not stored twice, as promised
        return
    if event.producer_id:
        store.producer_ids.add(event.producer_id)
    if event.type != "message":
        return  # grants are not rendered
    assert event_id not in ("", "dup")
    place = positions.parse_redis_id(event_id)
    assert place is not None
    replayed = store.run(store.store.replay(sources=_sources(event), after=(positions.ZERO,), until=(place,)))
    [stored] = replayed[-1:]
    assert stored.id == event_id

    frame = sse.id_line(stored.id) + render(stored)  # as a stream writes it
    text = frame.decode("utf-8")  # a browser decodes the stream as UTF-8
    assert text.endswith("\n\n")
    assert "\r" not in text
    lines = text[:-2].split("\n")
    assert lines[0] == f"id: {event_id}"
    assert lines[1] == f"event: {event.event}"
    assert len(lines) == 3
    assert lines[2].startswith("data: ")
    payload = json.loads(lines[2].removeprefix("data: "), parse_constant=_no_constants)
    assert payload["data"] == json.loads(event.data_json)


def _sources(event: envelope.Event) -> list[Source]:
    source = Keyspace().source_of(
        type=event.type, user=event.user, process_instance=event.process_instance, broadcast=event.broadcast
    )
    assert source is not None
    return [source]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"[" * 100_000, Rejection.TOO_DEEP),
        (_deep(65), Rejection.TOO_DEEP),
        (b'{"user":"ana","data":' + b"1" * 5000 + b"}", Rejection.BAD_NUMBER),
        (b'{"user":"ana","data":NaN}', Rejection.BAD_NUMBER),
        (b'{"user":"ana","data":1e400}', Rejection.BAD_NUMBER),
        (b'{"user":"ana","data":"\\ud800"}', Rejection.BAD_STRING),
        (b'{"user":"ana","data":{"k\\udc00":1}}', Rejection.BAD_STRING),
        (b'{"user":"ana","user":"bob","data":1}', Rejection.DUPLICATE_KEY),
        (b'{"user":"ana","data":{"a":1,"a":1}}', Rejection.DUPLICATE_KEY),
        (b'{"user":"ana","id":"a\\u0000b","data":1}', Rejection.BAD_ID),
        (b'{"user":"ana","id":"\\ud800","data":1}', Rejection.BAD_ID),
        (b'{"user":"\\ud800","data":1}', Rejection.BAD_USER),
        (b'{"processInstanceUuid":"pi-1\\n","data":1}', Rejection.BAD_PROCESS_INSTANCE),
        (b'{"user":"ana","event":"Data\\n","data":1}', Rejection.BAD_EVENT),
    ],
)
def test_each_class_of_hostile_value_has_its_reason(value: bytes, reason: Rejection) -> None:
    with pytest.raises(InvalidRecord) as caught:
        parse(value, max_bytes=10**6)
    assert caught.value.reason is reason


def test_deep_but_allowed_nesting_and_control_characters_in_data_are_delivered() -> None:
    event = parse(_deep(63), max_bytes=10**6)
    assert event.data_json.count("[") == 63
    event = parse(b'{"user":"ana","data":"\\u0000\\r\\n"}', max_bytes=10**6)
    assert event.data_json == '"\\u0000\\r\\n"'  # escaped: it cannot break a frame


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (-1, "received"),  # no timestamp (old producers)
        (-5000, "received"),
        (0, 0),
        (1_700_000_000_000, 1_700_000_000_000),
        (1_700_000_000_000_000, "received"),  # microseconds: the year ~55,800
        ("now+1min", "kept"),
        ("now+10min", "received"),
    ],
)
def test_a_record_timestamp_outside_what_is_plausible_becomes_the_receive_time(timestamp: Any, expected: Any) -> None:
    received = 1_800_000_000_000
    if timestamp == "now+1min":
        timestamp = received + 60_000
    elif timestamp == "now+10min":
        timestamp = received + 600_000
    result = published_ms(timestamp, received_ms=received)
    if expected == "received":
        assert result == received
    elif expected == "kept":
        assert result == timestamp
    else:
        assert result == expected


def test_rendering_never_fails_on_a_timestamp_stored_before_the_check() -> None:
    assert sse.iso_from_ms(10**18) == "9999-12-31T23:59:59.999Z"
    assert sse.iso_from_ms(-(10**18)) == "1970-01-01T00:00:00.000Z"
