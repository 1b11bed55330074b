"""Event -> SSE frame bytes; comments and control fields. No I/O.

Every value placed in a field is stripped of CR and LF so that nothing a producer or client sends can
start a new SSE field. Payloads are JSON, which never contains a raw line break.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime

_LINE_BREAKS = str.maketrans({"\r": "", "\n": "", "\0": ""})
PING = b": ping\n\n"


def clean(value: str) -> str:
    """A value safe to put after `field: ` on one line."""
    # Looking is much cheaper than translating, and almost every value has nothing to remove.
    if "\n" in value or "\r" in value or "\0" in value:
        return value.translate(_LINE_BREAKS)
    return value


# The range a timestamp can be written in (year 1970 to 9999); the consumer stores nothing outside it.
_MAX_MS = 253_402_300_799_999


def iso_from_ms(ms: int) -> str:
    """ISO 8601 in UTC with milliseconds; a value outside 1970..9999 is clamped, never an error."""
    ms = min(max(int(ms), 0), _MAX_MS)
    seconds, millis = divmod(ms, 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _iso_second(seconds: int) -> str:
    # Events arrive in time order: consecutive ones share their second, so this is formatted once per second.
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def payload(
    *, data_json: str, process_instance: str | None, user: str | None, broadcast: bool, published_ms: int
) -> str:
    """The `data:` JSON of the contract: the producer's data and where it came from."""
    return (
        '{"data":'
        + data_json
        + ',"processInstanceUuid":'
        + _json_string(process_instance)
        + ',"user":'
        + _json_string(user)
        + ',"broadcast":'
        + ("true" if broadcast else "false")
        + ',"publishedAt":"'
        + iso_from_ms(published_ms)
        + '"}'
    )


@functools.lru_cache(maxsize=16384)
def _json_string(value: str | None) -> str:
    # Users and process instances recur from event to event: each is encoded once.
    return json.dumps(value, ensure_ascii=False)


def frame(event_id: str, event: str, data: str) -> bytes:
    """One SSE event. `data` must be a single line (JSON is)."""
    return id_line(event_id) + body(event, data)


def id_line(event_id: str) -> bytes:
    return f"id: {clean(event_id)}\n".encode()


def body(event: str, data: str) -> bytes:
    """An SSE event without its id line (streams that share an event add their own)."""
    return f"event: {clean(event)}\ndata: {clean(data)}\n\n".encode()


def retry(ms: int) -> bytes:
    return f"retry: {int(ms)}\n\n".encode()


def position(event_id: str) -> bytes:
    """An id-only block: moves the client's Last-Event-ID without dispatching an event."""
    return f"id: {clean(event_id)}\n\n".encode()


def control(event: str, data: dict[str, object], event_id: str | None = None) -> bytes:
    """A gateway event (stream-reset, unsubscribed, auth-expired, ...)."""
    head = f"id: {clean(event_id)}\n" if event_id else ""
    return f"{head}event: {clean(event)}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
