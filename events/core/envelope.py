"""Kafka record value -> validated Event, or a precise rejection (CONTRACT section 3). No I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

EVENT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Process instance ids become parts of Redis keys and group names: keep them to a safe alphabet.
PROCESS_INSTANCE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
USER_MAX_LENGTH = 150  # Django's username length
PRODUCER_ID_MAX_LENGTH = 200
TYPES = frozenset({"message", "connect", "disconnect"})


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


def parse(value: bytes | None, *, max_bytes: int, default_type: str = "message") -> Event:
    """Validate one record value; raise InvalidRecord with a distinct reason for each fault."""
    if value is None or len(value) == 0:
        raise InvalidRecord(Rejection.EMPTY, "record has no value")
    if len(value) > max_bytes:
        raise InvalidRecord(Rejection.TOO_LARGE, f"{len(value)} bytes is over the {max_bytes}-byte limit")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(Rejection.NOT_UTF8, f"value is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        envelope = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRecord(Rejection.NOT_JSON, f"value is not JSON ({exc.msg} at char {exc.pos})") from exc
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
    if producer_id is not None and len(producer_id) > PRODUCER_ID_MAX_LENGTH:
        raise InvalidRecord(Rejection.BAD_ID, f"id must be at most {PRODUCER_ID_MAX_LENGTH} characters")

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
    return Event(kind, event, user, process_instance, broadcast, data_json, producer_id)
