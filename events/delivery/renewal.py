"""Token renewal of open bearer streams, across web processes.

A bearer stream (opened with `Authorization: Bearer`, or with a ticket bought with one) ends at its token's
`exp`. That end is also kept in Redis (routing.stream_expiry_key), written when the stream opens.
`POST /api/events/streams/<stream id>/token` with a fresh token of the stream's user moves it later, on
whichever web process takes the POST; the process holding the stream reads it when the stream reaches its
end (the hub's ticker, `settle`) and either moves the stream's end or closes it with `auth-expired`.
Only Redis is shared: no message between web processes, nothing lost if one restarts.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis

from events.core import routing
from events.core.records import CloseReason

logger = logging.getLogger(__name__)

# A stream's end stays in Redis this long after it passes, so the holding process still finds it when its
# ticker (every second, later on a busy loop) gets to the stream.
KEY_GRACE_SECONDS = 60
# What the stream endpoint issues (str(uuid.uuid4())); anything else is not a stream id.
STREAM_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")

# KEYS[1] the stream's end; ARGV: the new end, the key's lifetime in seconds. The end only moves later, so
# two renewals racing leave the later token's exp. Returns {1, new}, {0, current}, or {-1, ''} for a stream
# with no end (a session's). Ends travel as strings: Redis would turn a Lua number into an integer.
_MOVE_LATER_LUA = """
local current = redis.call('GET', KEYS[1])
if not current then return {-1, ''} end
if tonumber(ARGV[1]) <= tonumber(current) then return {0, current} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return {1, ARGV[1]}
"""


class Outcome(enum.Enum):
    RENEWED = "renewed"
    NOT_LATER = "not-later"  # the token expires no later than the stream already does
    NO_END = "no-end"  # the stream has no token to renew (opened with a session, or a ticket bought with one)
    UNKNOWN = "unknown"  # no open stream of this user has this id


class Renewal(NamedTuple):
    outcome: Outcome
    expires_at: float | None  # the stream's end after the call (None: an unknown stream, or one without an end)


class Expiring(Protocol):
    """What `settle` needs of a stream (events/delivery/stream.py)."""

    id: str
    expires_at: float | None

    def renew(self, expires_at: float) -> None: ...

    def close(self, reason: CloseReason) -> None: ...


def _lifetime(expires_at: float, now: float) -> int:
    return max(1, int(expires_at - now) + KEY_GRACE_SECONDS)


def expiry_record(stream_id: str, expires_at: float) -> tuple[str, str, int]:
    """Where and how a bearer stream's end is kept: key, value, seconds to live."""
    return routing.stream_expiry_key(stream_id), repr(expires_at), _lifetime(expires_at, time.time())


async def record_expiry(redis: aioredis.Redis, stream_id: str, expires_at: float) -> None:
    """Keep a bearer stream's end where renewals and its holding process find it (at open)."""
    key, value, seconds = expiry_record(stream_id, expires_at)
    await redis.execute_command("SET", key, value, "EX", seconds)


async def renew(redis: aioredis.Redis, *, user: str, stream_id: str, expires_at: float) -> Renewal:
    """Move the end of `user`'s open stream `stream_id` to `expires_at`, if that is later.

    The stream must be in the user's open-stream set (every web process keeps its streams' slots there):
    someone else's stream and an unknown one look the same.
    """
    now = time.time()
    score = await redis.zscore(routing.STREAMS_OF_USER_PREFIX + user, stream_id)
    if score is None or score <= now:
        return Renewal(Outcome.UNKNOWN, None)
    moved, end = await redis.eval(
        _MOVE_LATER_LUA, 1, routing.stream_expiry_key(stream_id), repr(expires_at), _lifetime(expires_at, now)
    )
    if int(moved) < 0:
        return Renewal(Outcome.NO_END, None)
    return Renewal(Outcome.RENEWED if int(moved) else Outcome.NOT_LATER, float(end))


async def settle(redis: aioredis.Redis, streams: Sequence[Expiring], now: float) -> None:
    """Streams at their end: move the end of each one renewed since, close the others with auth-expired.

    If Redis cannot say, the streams close: a token is not trusted beyond its exp (the client reconnects).
    """
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.get(routing.stream_expiry_key(stream.id))
            ends: list[bytes | None] = await pipe.execute()
    except (aioredis.RedisError, OSError):
        logger.warning("cannot read renewed token ends; closing the streams at their end", exc_info=True)
        ends = [None] * len(streams)
    for stream, raw in zip(streams, ends, strict=True):
        end = float(raw) if raw is not None else None
        if end is not None and end > now and (stream.expires_at is None or end > stream.expires_at):
            stream.renew(end)
        else:
            stream.close(CloseReason.AUTH_EXPIRED)
