"""SSE frames: exact wire format, and nothing a value contains can start a new field."""

from events.core import sse


def test_frame_wire_format() -> None:
    assert sse.frame("1-0", "Data", '{"a":1}') == b'id: 1-0\nevent: Data\ndata: {"a":1}\n\n'


def test_values_cannot_inject_fields() -> None:
    frame = sse.frame("1-0\nevent: evil", "Data\r\ndata: injected", '{"a":"x"}\n\ndata: more')
    lines = frame.decode().split("\n")
    assert lines[:3] == ["id: 1-0event: evil", "event: Datadata: injected", 'data: {"a":"x"}data: more']
    assert frame.count(b"\n\n") == 1


def test_payload_is_one_json_line_with_iso_time() -> None:
    text = sse.payload(
        data_json='{"t":"a\\nb"}', process_instance=None, user="ålice", broadcast=False, published_ms=1_700_000_000_123
    )
    assert "\n" not in text
    assert text == (
        '{"data":{"t":"a\\nb"},"processInstanceUuid":null,"user":"ålice","broadcast":false,'
        '"publishedAt":"2023-11-14T22:13:20.123Z"}'
    )


def test_control_frames() -> None:
    assert sse.retry(3000) == b"retry: 3000\n\n"
    assert sse.position("5-1") == b"id: 5-1\n\n"
    assert (
        sse.control("stream-reset", {"reason": "x"}, "5-1")
        == b'id: 5-1\nevent: stream-reset\ndata: {"reason": "x"}\n\n'
    )
