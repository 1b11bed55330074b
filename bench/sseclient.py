"""A load-generating SSE client on raw asyncio sockets, run as worker processes by bench/delivery.py
(bench/support.py `Clients`).

Each stream is one asyncio.Protocol: the HTTP head is parsed once, then every `data_received` decodes
whole HTTP/1.1 chunks and counts complete SSE blocks that carry a `"publishedAt":"<ISO 8601>"` field
(both the gateway's and the peer's events do). Latency is the receipt time of the bytes minus that
timestamp, kept as a histogram of 0.1 ms buckets so that workers' figures merge exactly.

Protocol with the parent: one JSON command per line on stdin, one JSON reply per line on stdout.
    {"cmd": "open", "host": h, "port": p, "path": "/...", "tokens": [...], "concurrency": n}
    {"cmd": "stats", "reset": bool}     counts and the latency histogram since the last reset
    {"cmd": "cycle", ..., "count": n}   connect, wait for the first bytes, disconnect; n times
    {"cmd": "close"}                    close every stream
    {"cmd": "quit"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from datetime import datetime
from typing import Any

MARKER = b'"publishedAt":"'
ISO_LEN = 24  # 2026-01-02T03:04:05.678Z
BUCKETS_PER_MS = 10
OPEN_TIMEOUT = 120.0


class Totals:
    """What every stream of this worker has received since the last reset."""

    def __init__(self) -> None:
        self.events = 0
        self.hist: dict[int, int] = {}
        self.first_receipt = 0.0
        self.last_receipt = 0.0
        self.per_second: dict[int, int] = {}
        self._stamps: dict[bytes, float] = {}

    def reset(self) -> None:
        self.events = 0
        self.hist = {}
        self.first_receipt = self.last_receipt = 0.0
        self.per_second = {}
        if len(self._stamps) > 200_000:
            self._stamps = {}

    def stamp_ms(self, iso: bytes) -> float:
        """The ISO 8601 timestamp as epoch milliseconds (cached: a broadcast repeats it per stream)."""
        ms = self._stamps.get(iso)
        if ms is None:
            ms = datetime.fromisoformat(iso.decode()).timestamp() * 1000
            self._stamps[iso] = ms
        return ms


TOTALS = Totals()


class SSEStream(asyncio.Protocol):
    def __init__(self, request: bytes, opened: asyncio.Future[str | None]) -> None:
        self.request = request
        self.opened = opened
        self.transport: asyncio.Transport | None = None
        self.head_done = False
        self.chunked = True
        self.status = 0
        self.raw = b""
        self.sse = b""
        self.events = 0
        self.bytes = 0
        self.closing = False
        self.lost = asyncio.get_running_loop().create_future()
        self.server_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.raw:
            data = self.raw + data
            self.raw = b""
        if not self.head_done:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.raw = data
                return
            self._head(data[:end])
            data = data[end + 4 :]
            if self.status != 200:
                self._fail(f"HTTP {self.status}: {data[:200]!r}")
                return
        if not self.chunked:
            self._payload(data, now)
            return
        pos, size_of = 0, len(data)
        pieces: list[bytes] = []
        while pos < size_of:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(data[pos:eol].split(b";", 1)[0], 16)
            end = eol + 2 + size
            if end + 2 > size_of:
                break
            if size == 0:
                pos = size_of
                break
            pieces.append(data[eol + 2 : end])
            pos = end + 2
        if pos < size_of:
            self.raw = data[pos:]
        if pieces:
            self._payload(pieces[0] if len(pieces) == 1 else b"".join(pieces), now)

    def _head(self, head: bytes) -> None:
        self.head_done = True
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip().lower()
        self.chunked = headers.get(b"transfer-encoding") == b"chunked"

    def _payload(self, payload: bytes, now: float) -> None:
        self.bytes += len(payload)
        if not self.opened.done():
            self.opened.set_result(None)
        buf = self.sse + payload if self.sse else payload
        last = buf.rfind(b"\n\n")
        if last < 0:
            self.sse = buf
            return
        self.sse = buf[last + 2 :]
        i = buf.find(MARKER, 0, last)
        if i < 0:
            return
        totals = TOTALS
        hist = totals.hist
        count = 0
        while i >= 0:
            start = i + len(MARKER)
            iso = buf[start : start + ISO_LEN]
            bucket = int((now * 1000 - totals.stamp_ms(iso)) * BUCKETS_PER_MS)
            if bucket < 0:
                bucket = 0
            hist[bucket] = hist.get(bucket, 0) + 1
            count += 1
            i = buf.find(MARKER, start + ISO_LEN, last)
        self.events += count
        totals.events += count
        if not totals.first_receipt:
            totals.first_receipt = now
        totals.last_receipt = now
        second = int(now)
        totals.per_second[second] = totals.per_second.get(second, 0) + count

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_result(reason)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.server_closed = True
        if not self.opened.done():
            self.opened.set_result(f"connection lost before the stream opened: {exc!r}")
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


def request_bytes(host: str, port: int, path: str, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        f"Cache-Control: no-cache\r\nAuthorization: Bearer {token}\r\nUser-Agent: bench-sseclient\r\n\r\n"
    ).encode()


class Worker:
    def __init__(self) -> None:
        self.streams: list[SSEStream] = []

    async def connect(self, host: str, port: int, path: str, token: str) -> tuple[SSEStream | None, str | None]:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[str | None] = loop.create_future()
        try:
            _, stream = await asyncio.wait_for(
                loop.create_connection(lambda: SSEStream(request_bytes(host, port, path, token), opened), host, port),
                OPEN_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            return None, repr(exc)
        try:
            error = await asyncio.wait_for(opened, OPEN_TIMEOUT)
        except TimeoutError:
            error = f"no response within {OPEN_TIMEOUT:.0f}s"
        if error is not None:
            stream.close()
            return None, error
        return stream, None

    async def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open one stream per token, `concurrency` at a time; returns how many opened and how fast."""
        tokens: list[str] = cmd["tokens"]
        sem = asyncio.Semaphore(cmd.get("concurrency", 50))
        errors: list[str] = []
        started = time.monotonic()

        async def one(token: str) -> None:
            async with sem:
                stream, error = await self.connect(cmd["host"], cmd["port"], cmd["path"], token)
            if stream is not None:
                self.streams.append(stream)
            else:
                errors.append(error or "?")

        await asyncio.gather(*(one(t) for t in tokens))
        return {
            "opened": len(tokens) - len(errors),
            "failed": len(errors),
            "errors": errors[:5],
            "seconds": time.monotonic() - started,
        }

    async def cycle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Connect, wait for the stream's first bytes, disconnect: `count` times, `concurrency` at once."""
        tokens: list[str] = cmd["tokens"]
        count = int(cmd["count"])
        sem = asyncio.Semaphore(cmd.get("concurrency", 10))
        errors: list[str] = []
        started = time.monotonic()

        async def one(i: int) -> None:
            async with sem:
                stream, error = await self.connect(cmd["host"], cmd["port"], cmd["path"], tokens[i % len(tokens)])
                if stream is None:
                    errors.append(error or "?")
                    return
                stream.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.lost, 10)

        await asyncio.gather(*(one(i) for i in range(count)))
        return {"cycles": count, "failed": len(errors), "errors": errors[:5], "seconds": time.monotonic() - started}

    def stats(self, reset: bool) -> dict[str, Any]:
        t = TOTALS
        out = {
            "events": t.events,
            "hist": t.hist,
            "first_receipt": t.first_receipt,
            "last_receipt": t.last_receipt,
            "per_second": t.per_second,
            "open": sum(1 for s in self.streams if not s.lost.done()),
            "server_closed": sum(1 for s in self.streams if s.server_closed),
            "cpu_s": sum(os.times()[:2]),
        }
        if reset:
            t.reset()
        return out

    async def close(self) -> dict[str, Any]:
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.close()
        pending = [s.lost for s in streams if not s.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=30)
        return {"closed": len(streams)}


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (want, hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(limit, soft), max(limit, hard)))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve() -> None:
    """Answer the parent's commands until `quit` or end of input."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker()
    while line := await reader.readline():
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "open":
            reply = await worker.open(cmd)
        elif name == "cycle":
            reply = await worker.cycle(cmd)
        elif name == "stats":
            reply = worker.stats(bool(cmd.get("reset")))
        elif name == "close":
            reply = await worker.close()
        elif name == "quit":
            await worker.close()
            break
        else:
            reply = {"error": f"unknown command {name}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(serve())
