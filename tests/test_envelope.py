"""Every rejection reason of the envelope is distinct, and valid envelopes parse to what producers meant."""

import json

import pytest

from events.core.envelope import Event, InvalidRecord, Rejection, parse


def _parse(value: object, default_type: str = "message") -> Event:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return parse(raw, max_bytes=10_000, default_type=default_type)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", Rejection.EMPTY),
        (b"\xff\xfe{}", Rejection.NOT_UTF8),
        (b"{not json", Rejection.NOT_JSON),
        ([1, 2], Rejection.NOT_OBJECT),
        ("just a string", Rejection.NOT_OBJECT),
        ({"type": "shout", "user": "a", "data": 1}, Rejection.BAD_TYPE),
        ({"type": 3, "user": "a", "data": 1}, Rejection.BAD_TYPE),
        ({"event": "has space", "user": "a", "data": 1}, Rejection.BAD_EVENT),
        ({"event": "x\nid: 1", "user": "a", "data": 1}, Rejection.BAD_EVENT),
        ({"event": "e" * 65, "user": "a", "data": 1}, Rejection.BAD_EVENT),
        ({"user": 42, "data": 1}, Rejection.BAD_USER),
        ({"user": "a\nb", "data": 1}, Rejection.BAD_USER),
        ({"user": "u" * 151, "data": 1}, Rejection.BAD_USER),
        ({"processInstanceUuid": "p/1", "data": 1}, Rejection.BAD_PROCESS_INSTANCE),
        ({"processInstanceUuid": ["p"], "data": 1}, Rejection.BAD_PROCESS_INSTANCE),
        ({"broadcast": "yes", "data": 1}, Rejection.BAD_BROADCAST),
        ({"user": "a", "data": 1, "id": 7}, Rejection.BAD_ID),
        ({"user": "a", "data": 1, "id": "i" * 201}, Rejection.BAD_ID),
        ({"user": "a"}, Rejection.MISSING_DATA),
        ({"data": {"x": 1}}, Rejection.NO_TARGET),
        ({"broadcast": False, "data": 1}, Rejection.NO_TARGET),
        ({"broadcast": True, "user": "a", "data": 1}, Rejection.AMBIGUOUS_TARGET),
        ({"type": "connect", "user": "a"}, Rejection.GRANT_FIELDS),
        ({"type": "disconnect", "processInstanceUuid": "p1"}, Rejection.GRANT_FIELDS),
        ({"type": "connect", "user": "a", "processInstanceUuid": "p1", "broadcast": True}, Rejection.AMBIGUOUS_TARGET),
    ],
)
def test_rejections_name_their_reason(value: object, reason: Rejection) -> None:
    with pytest.raises(InvalidRecord) as caught:
        _parse(value)
    assert caught.value.reason is reason
    assert str(caught.value).startswith(reason.value + ": ")


def test_too_large_is_rejected_before_parsing() -> None:
    with pytest.raises(InvalidRecord) as caught:
        parse(b'{"user": "a", "data": "' + b"x" * 200 + b'"}', max_bytes=100)
    assert caught.value.reason is Rejection.TOO_LARGE


def test_every_rejection_reason_is_distinct() -> None:
    values = [r.value for r in Rejection]
    assert len(values) == len(set(values))


def test_message_defaults() -> None:
    event = _parse({"user": "alice", "data": {"progressUpdateDTO": {"currentNodeId": "n1"}}})
    assert event == Event(
        "message", "message", "alice", None, False, '{"progressUpdateDTO":{"currentNodeId":"n1"}}', None
    )


def test_full_envelope() -> None:
    event = _parse(
        {
            "type": "message",
            "event": "ProcessMetadata",
            "processInstanceUuid": "3f1c-aa",
            "user": "alice",
            "broadcast": False,
            "data": ["ü", "line\nbreak", None],
            "id": "producer-1",
        }
    )
    assert (event.event, event.user, event.process_instance, event.producer_id) == (
        "ProcessMetadata",
        "alice",
        "3f1c-aa",
        "producer-1",
    )
    assert json.loads(event.data_json) == ["ü", "line\nbreak", None]
    assert "\n" not in event.data_json


def test_data_may_be_any_json_including_null() -> None:
    assert _parse({"broadcast": True, "data": None}).data_json == "null"


def test_topic_default_type_applies_when_type_is_absent() -> None:
    event = _parse({"user": "a", "processInstanceUuid": "p1"}, default_type="connect")
    assert (event.type, event.user, event.process_instance) == ("connect", "a", "p1")
    assert _parse({"type": "message", "user": "a", "data": 1}, default_type="connect").type == "message"


def test_disconnect_is_parsed() -> None:
    event = _parse({"type": "disconnect", "user": "a", "processInstanceUuid": "p1"})
    assert (event.type, event.event) == ("disconnect", "disconnect")
