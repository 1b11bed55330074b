"""docs/asyncapi.yaml is a valid AsyncAPI 3.0 document and says what the gateway does.

- The document validates against the official AsyncAPI 3.0.0 schema, vendored in tests/schemas/ (no network).
- Its Envelope schema accepts exactly the records `envelope.parse` accepts, over a corpus generated with
  Hypothesis from the envelope's fields (valid and invalid values of each, wrong types, extra keys). The
  rules no JSON Schema can state (duplicate keys, depth, NaN, lone surrogates, printable beyond the
  control characters) are kept out of that corpus and checked on their own as known gaps: parse refuses,
  the schema cannot.
- The SSE data payload the gateway renders validates against SseData, and every named event the delivery
  code sends is described.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, FormatChecker

from events.core import envelope, sse

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
ASYNCAPI_SCHEMA = Path(__file__).parent / "schemas" / "asyncapi-3.0.0.json"
MAX_BYTES = 1 << 20


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return loaded


@cache
def schema_validator(name: str) -> Draft7Validator:
    return Draft7Validator(document()["components"]["schemas"][name], format_checker=FormatChecker())


def parse_accepts(value: bytes) -> bool:
    try:
        envelope.parse(value, max_bytes=MAX_BYTES)
    except envelope.InvalidRecord:
        return False
    return True


# --- the document itself -------------------------------------------------------------------------------
def test_document_is_valid_asyncapi_3() -> None:
    validator = Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document())]
    assert errors == []
    assert document()["asyncapi"] == "3.0.0"


def test_the_vendored_schema_catches_a_broken_document() -> None:
    """The check above is not vacuous: an AsyncAPI 2 style operation is refused."""
    validator = Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    broken = json.loads(json.dumps(document()))
    broken["operations"]["consumeEvents"]["action"] = "publish"
    assert not validator.is_valid(broken)


def test_every_rejection_reason_is_listed_in_the_dead_letter_header() -> None:
    headers = document()["components"]["schemas"]["DeadLetterHeaders"]["properties"]
    listed = set(re.findall(r"[a-z_0-9]+", headers["x-gateway-error"]["pattern"].split("(")[1].split(")")[0]))
    assert listed == {r.value for r in envelope.Rejection}


def test_every_named_event_the_stream_sends_is_described() -> None:
    sent = set()
    for source in (ROOT / "events" / "delivery").glob("*.py"):
        sent |= set(re.findall(r'sse\.control\(\s*"([^"]+)"', source.read_text()))
    assert sent, "the delivery code sends control events through sse.control"
    described = {m["name"] for m in document()["components"]["messages"].values()}
    assert sent <= described
    assert {"stream-reset", "unsubscribed", "auth-expired", "token-expiring"} <= described


def test_examples_validate_against_their_payload_schemas() -> None:
    messages = document()["components"]["messages"]
    checked = 0
    for message in messages.values():
        ref = message.get("payload", {}).get("$ref", "")
        for example in message.get("examples", []):
            validator = schema_validator(ref.rsplit("/", 1)[1])
            assert validator.is_valid(example["payload"]), example["name"]
            if ref.endswith("/Envelope"):
                assert parse_accepts(json.dumps(example["payload"]).encode()), example["name"]
            checked += 1
    assert checked >= 5


# --- the envelope schema against parse -------------------------------------------------------------------
# Text the schema can judge exactly: printable characters of every script, and the control characters its
# pattern excludes. (Format characters, separators other than the space, private-use and unassigned code
# points are non-printable too, which no JSON Schema pattern can enumerate: see test_known_gaps.)
judgeable = st.characters(categories=["L", "M", "N", "P", "S", "Cc"], include_characters=" ")
text = st.one_of(
    st.text(judgeable, max_size=12),
    st.sampled_from(["", " ", "alice", "a b", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 150, "x" * 151]),
    st.sampled_from(["y" * 200, "y" * 201, "\x00", "a\tb", "\x7f", "\x9f", "é", "p-1", "a.b:c-d_e", "p/1", "p 1"]),
)
# A trailing newline is left out: parse refuses it (its patterns end in `\Z`), as an ECMAScript validator of
# the schema would, but jsonschema runs the schema's `$` with Python's `re`, which also matches before a final
# "\n". That is the validator's gap, not the schema's.
text = text.filter(lambda s: not s.endswith("\n"))
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_data = st.recursive(
    scalars, lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3), max_leaves=8
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from([None, "", "message", "connect", "disconnect", "Message", "shout", 1, True, []]),
    "event": st.sampled_from(["Data", "message", "a.b:c-d_e", "x" * 64]) | text | json_data,
    "user": st.sampled_from(["alice", "bob"]) | text | json_data,
    "processInstanceUuid": st.sampled_from(["pi-1", "3f1c.a:b_c-d"]) | text | json_data,
    "broadcast": st.sampled_from([True, False, None, 0, 1, "true", "false", ""]),
    "id": st.sampled_from(["evt-1"]) | text | json_data,
    "data": json_data,
}


VALID_SHAPES: list[dict[str, st.SearchStrategy[Any]]] = [
    {"user": st.sampled_from(["alice", "bob"]), "data": json_data},
    {"processInstanceUuid": st.sampled_from(["pi-1", "3f1c.a:b_c-d"]), "data": json_data},
    {"user": st.just("alice"), "processInstanceUuid": st.just("pi-1"), "event": st.just("Data"), "data": json_data},
    {"broadcast": st.just(True), "data": json_data},
    {
        "type": st.sampled_from(["connect", "disconnect"]),
        "user": st.just("alice"),
        "processInstanceUuid": st.just("pi-1"),
    },
]


@st.composite
def envelopes(draw: st.DrawFn) -> Any:
    """Half start from a valid record of some shape and change a field or two (so that both verdicts are
    common); the rest are any mix of the fields. Now and then not an object at all."""
    roll = draw(st.integers(0, 19))
    if roll == 0:
        return draw(json_data)
    record: dict[str, Any] = {}
    if roll < 10:
        record = {name: draw(value) for name, value in draw(st.sampled_from(VALID_SHAPES)).items()}
        for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=2)):
            if draw(st.booleans()):
                record[name] = draw(FIELDS[name])
            else:
                record.pop(name, None)
    else:
        chosen = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True))
        record = {name: draw(FIELDS[name]) for name in chosen}
    record.update(draw(st.dictionaries(st.sampled_from(["extra", "Data", "USER", "kind"]), json_data, max_size=2)))
    return record


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes())
def test_parse_accepts_exactly_what_the_envelope_schema_accepts(record: Any) -> None:
    value = json.dumps(record).encode()
    assert parse_accepts(value) == schema_validator("Envelope").is_valid(record), value


VALID = [
    {"user": "alice", "data": None},
    {"processInstanceUuid": "pi-1", "event": "", "data": {"a": [1, 2.5, "x"]}},
    {"broadcast": True, "user": "", "processInstanceUuid": None, "data": 1},
    {"type": "", "user": "alice", "processInstanceUuid": "pi-1", "broadcast": False, "data": "x", "id": "p-1"},
    {"type": "connect", "user": "alice", "processInstanceUuid": "pi-1"},
    {"type": "disconnect", "user": "alice", "processInstanceUuid": "pi-1", "broadcast": None, "data": 5},
    {"user": "x" * 150, "id": "y" * 200, "event": "e" * 64, "processInstanceUuid": "p" * 128, "data": {}},
    {"user": "a b é 名前", "data": [], "unknown": {"kept": "out"}},
]
INVALID = [
    [],
    "text",
    {"user": "alice"},  # missing_data
    {"data": 1},  # no_target
    {"user": "", "processInstanceUuid": "", "data": 1},  # no_target
    {"broadcast": False, "data": 1},  # no_target
    {"broadcast": True, "user": "alice", "data": 1},  # ambiguous_target
    {"type": "connect", "user": "alice"},  # grant_fields
    {"type": "connect", "user": "alice", "processInstanceUuid": "pi-1", "broadcast": True},  # ambiguous_target
    {"type": "Message", "user": "alice", "data": 1},  # bad_type
    {"type": 1, "user": "alice", "data": 1},  # bad_type
    {"event": "has space", "user": "alice", "data": 1},  # bad_event
    {"event": "e" * 65, "user": "alice", "data": 1},  # bad_event
    {"event": 5, "user": "alice", "data": 1},  # bad_event
    {"user": "x" * 151, "data": 1},  # bad_user
    {"user": "a\x00b", "data": 1},  # bad_user
    {"user": ["alice"], "data": 1},  # bad_user
    {"processInstanceUuid": "p/1", "data": 1},  # bad_process_instance
    {"processInstanceUuid": "p" * 129, "data": 1},  # bad_process_instance
    {"broadcast": "true", "data": 1},  # bad_broadcast
    {"broadcast": 1, "data": 1},  # bad_broadcast
    {"id": "y" * 201, "user": "alice", "data": 1},  # bad_id
    {"id": 7, "user": "alice", "data": 1},  # bad_id
]


@pytest.mark.parametrize("record", VALID, ids=range(len(VALID)))
def test_valid_records_pass_both(record: Any) -> None:
    assert parse_accepts(json.dumps(record).encode())
    assert schema_validator("Envelope").is_valid(record)


@pytest.mark.parametrize("record", INVALID, ids=range(len(INVALID)))
def test_invalid_records_fail_both(record: Any) -> None:
    assert not parse_accepts(json.dumps(record).encode())
    assert not schema_validator("Envelope").is_valid(record)


# What only parse can refuse (the document's description lists these): the raw value, the reason parse
# gives, and the value a lenient JSON reader makes of it, which the schema accepts.
KNOWN_GAPS = [
    (b'{"user": "a", "user": "b", "data": 1}', envelope.Rejection.DUPLICATE_KEY),
    (b'{"user": "a", "data": ' + b"[" * 64 + b"]" * 64 + b"}", envelope.Rejection.TOO_DEEP),
    (b'{"user": "a", "data": NaN}', envelope.Rejection.BAD_NUMBER),
    (b'{"user": "a", "data": 1e999}', envelope.Rejection.BAD_NUMBER),
    (b'{"user": "a", "data": "\\ud800"}', envelope.Rejection.BAD_STRING),
    (b'{"user": "a\\u200bb", "data": 1}', envelope.Rejection.BAD_USER),
    (b'{"user": "a", "id": "x\\u2028y", "data": 1}', envelope.Rejection.BAD_ID),
]


@pytest.mark.parametrize(("value", "reason"), KNOWN_GAPS, ids=[r.value for _, r in KNOWN_GAPS])
def test_known_gaps_parse_refuses_what_the_schema_cannot_express(value: bytes, reason: envelope.Rejection) -> None:
    with pytest.raises(envelope.InvalidRecord) as refused:
        envelope.parse(value, max_bytes=MAX_BYTES)
    assert refused.value.reason == reason
    assert schema_validator("Envelope").is_valid(json.loads(value))
    assert reason.value in document()["info"]["description"]


# --- the SSE payload -------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    data=json_data,
    process_instance=st.none() | st.sampled_from(["pi-1", "3f1c.a:b_c-d"]),
    user=st.none() | text,
    broadcast=st.booleans(),
    published_ms=st.integers(-(10**15), 10**15),
)
def test_rendered_sse_data_matches_the_schema(
    data: Any, process_instance: str | None, user: str | None, broadcast: bool, published_ms: int
) -> None:
    rendered = sse.payload(
        data_json=json.dumps(data, ensure_ascii=False, separators=(",", ":")),
        process_instance=process_instance,
        user=user,
        broadcast=broadcast,
        published_ms=published_ms,
    )
    errors = [e.message for e in schema_validator("SseData").iter_errors(json.loads(rendered))]
    assert errors == []
