"""Kafka record value -> validated Event, or a precise rejection (CONTRACT section 3). No I/O.

Whatever bytes a producer writes, `parse` returns an Event that every later step can store and a browser's
`JSON.parse` can read, or raises InvalidRecord with a reason; it raises nothing else. What is refused beyond
the contract's field rules: nesting deeper than MAX_DEPTH, numbers JSON cannot carry (NaN, Infinity, a float
that overflows, an integer past Python's digit limit), strings holding a lone surrogate, and duplicate keys
in any object (parsers disagree on which one wins).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

EVENT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
# Process instance ids become parts of Redis keys and group names: keep them to a safe alphabet.
PROCESS_INSTANCE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
USER_MAX_LENGTH = 150  # Django's username length
PRODUCER_ID_MAX_LENGTH = 200
TYPES = frozenset({"message", "connect", "disconnect"})
# A record timestamp more than this ahead of the consumer's clock is a producer's mistake (microseconds
# instead of milliseconds gives the year ~58,000); such an event is published at the time it is received.
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000
# Deeper documents are refused: browsers and other consumers of the payload recurse to parse them.
MAX_DEPTH = 64


class Rejection(StrEnum):
    """Why a record was not accepted; the value is what `x-gateway-error` starts with."""

    TOO_LARGE = "too_large"
    EMPTY = "empty"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    BAD_TYPE = "bad_type"
    BAD_EVENT = "bad_event"
    BAD_USER = "bad_user"
    BAD_PROCESS_INSTANCE = "bad_process_instance"
    BAD_BROADCAST = "bad_broadcast"
    BAD_ID = "bad_id"
    MISSING_DATA = "missing_data"
    NO_TARGET = "no_target"
    AMBIGUOUS_TARGET = "ambiguous_target"
    GRANT_FIELDS = "grant_fields"
    TOO_DEEP = "too_deep"
    BAD_NUMBER = "bad_number"
    BAD_STRING = "bad_string"
    DUPLICATE_KEY = "duplicate_key"
    INTERNAL = "internal"  # the gateway failed on this record; kept in the dead-letter topic for a replay


class InvalidRecord(ValueError):
    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    event: str
    user: str | None
    process_instance: str | None
    broadcast: bool
    data_json: str  # the producer's `data`, re-serialised compactly ("null" for connect/disconnect)
    producer_id: str | None


def published_ms(timestamp_ms: int | None, *, received_ms: int) -> int:
    """The time an event counts as published: the Kafka record's timestamp, or the receive time when the
    record has none (-1), a negative one, or one more than MAX_CLOCK_SKEW_MS in the future."""
    if timestamp_ms is None or timestamp_ms < 0 or timestamp_ms > received_ms + MAX_CLOCK_SKEW_MS:
        return received_ms
    return timestamp_ms


def _optional_str(envelope: dict[str, Any], key: str) -> str | None:
    value = envelope.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRecord(_FIELD_REASON[key], f"{key} must be a string")
    return value


_FIELD_REASON = {
    "user": Rejection.BAD_USER,
    "processInstanceUuid": Rejection.BAD_PROCESS_INSTANCE,
    "id": Rejection.BAD_ID,
    "type": Rejection.BAD_TYPE,
    "event": Rejection.BAD_EVENT,
}


class _Refused(ValueError):
    """Raised from inside the JSON decoder's hooks; carries the reason out."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _no_constant(name: str) -> float:
    raise _Refused(Rejection.BAD_NUMBER, f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _Refused(Rejection.BAD_NUMBER, f"number {text[:20]}... is out of range")
    return number


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _Refused(Rejection.DUPLICATE_KEY, f"key {duplicate[:64]!r} appears more than once in an object")
    return obj


def _depth(value: Any) -> int:
    """Nesting depth of a decoded document (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _decode(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique)
    except _Refused as exc:
        raise InvalidRecord(exc.reason, exc.detail) from None
    except json.JSONDecodeError as exc:
        raise InvalidRecord(Rejection.NOT_JSON, f"value is not JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise InvalidRecord(Rejection.TOO_DEEP, f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # an integer past the digit limit (sys.set_int_max_str_digits)
        raise InvalidRecord(Rejection.BAD_NUMBER, f"a number JSON parsers cannot read ({str(exc)[:80]})") from None


def parse(value: bytes | None, *, max_bytes: int, default_type: str = "message") -> Event:
    """Validate one record value; raise InvalidRecord with a distinct reason for each fault, and nothing else."""
    if value is None or len(value) == 0:
        raise InvalidRecord(Rejection.EMPTY, "record has no value")
    if len(value) > max_bytes:
        raise InvalidRecord(Rejection.TOO_LARGE, f"{len(value)} bytes is over the {max_bytes}-byte limit")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(Rejection.NOT_UTF8, f"value is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    envelope = _decode(text)
    if _depth(envelope) > MAX_DEPTH:
        raise InvalidRecord(Rejection.TOO_DEEP, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(envelope, dict):
        raise InvalidRecord(Rejection.NOT_OBJECT, f"envelope must be a JSON object, not {type(envelope).__name__}")

    kind = _optional_str(envelope, "type") or default_type
    if kind not in TYPES:
        raise InvalidRecord(Rejection.BAD_TYPE, f"type must be one of message, connect, disconnect, not {kind!r}")

    event = _optional_str(envelope, "event") or "message"
    if not EVENT_NAME.match(event):
        raise InvalidRecord(Rejection.BAD_EVENT, "event must match ^[A-Za-z0-9_.:-]{1,64}$")

    user = _optional_str(envelope, "user")
    if user is not None and (len(user) > USER_MAX_LENGTH or not user.isprintable()):
        raise InvalidRecord(Rejection.BAD_USER, f"user must be printable and at most {USER_MAX_LENGTH} characters")

    process_instance = _optional_str(envelope, "processInstanceUuid")
    if process_instance is not None and not PROCESS_INSTANCE.match(process_instance):
        raise InvalidRecord(Rejection.BAD_PROCESS_INSTANCE, "processInstanceUuid must match ^[A-Za-z0-9_.:-]{1,128}$")

    broadcast = envelope.get("broadcast", False)
    if broadcast is None:
        broadcast = False
    if not isinstance(broadcast, bool):
        raise InvalidRecord(Rejection.BAD_BROADCAST, "broadcast must be true or false")

    producer_id = _optional_str(envelope, "id")
    if producer_id is not None and (len(producer_id) > PRODUCER_ID_MAX_LENGTH or not producer_id.isprintable()):
        raise InvalidRecord(Rejection.BAD_ID, f"id must be printable and at most {PRODUCER_ID_MAX_LENGTH} characters")

    if kind != "message":
        if user is None or process_instance is None:
            raise InvalidRecord(Rejection.GRANT_FIELDS, f"{kind} needs both user and processInstanceUuid")
        if broadcast:
            raise InvalidRecord(Rejection.AMBIGUOUS_TARGET, f"{kind} cannot be a broadcast")
        return Event(kind, kind, user, process_instance, False, "null", producer_id)

    if "data" not in envelope:
        raise InvalidRecord(Rejection.MISSING_DATA, "a message needs data")
    if broadcast and (user is not None or process_instance is not None):
        raise InvalidRecord(Rejection.AMBIGUOUS_TARGET, "a broadcast cannot also name a user or processInstanceUuid")
    if not broadcast and user is None and process_instance is None:
        raise InvalidRecord(Rejection.NO_TARGET, "a message needs user, processInstanceUuid or broadcast: true")
    data_json = json.dumps(envelope["data"], ensure_ascii=False, separators=(",", ":"))
    try:
        data_json.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRecord(Rejection.BAD_STRING, f"data holds a lone surrogate ({exc.object[exc.start]!r})") from None
    return Event(kind, event, user, process_instance, broadcast, data_json, producer_id)
