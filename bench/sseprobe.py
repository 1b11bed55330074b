"""A few named SSE streams, each watched on its own: a worker process of bench/scaleout.py (bench/trees.py
`Probe`), for the workloads that follow one or two clients closely (bursts, a stalled client, a resume, a
replay beside a live stream) rather than thousands (bench/sseclient.py).

Per stream it keeps the events received (SSE blocks carrying `"publishedAt":"<ISO 8601>"`), their latency
(receipt time minus that timestamp, 0.1 ms buckets), the last `id:` seen, the gateway's control events by
name, bytes, and whether the server ended the connection. A stream can stop reading its socket (`pause`:
the client stalls, the server's buffers fill) and start again (`resume`).

Protocol with the parent: one JSON command per line on stdin, one JSON reply per line on stdout, matched by
`id` (commands run concurrently):
    {"id": n, "cmd": "open", "name": s, "host": h, "port": p, "path": "/...", "token": t, "last_event_id": id?,
     "track_ids": bool}
        replies once the response head is in (or the connection failed): status, seconds; with `track_ids`,
        stats carry `receipts`: each event's id -> its receipt time (epoch s)
    {"id": n, "cmd": "stats", "name": s, "reset": bool}
    {"id": n, "cmd": "wait", "name": s, "events": k, "timeout": s, "idle": s}
        replies once the stream has k events, the server closed it, `timeout` passed, or nothing arrived
        for `idle` seconds
    {"id": n, "cmd": "pause" | "resume" | "close", "name": s}
    {"id": n, "cmd": "quit"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import traceback
from datetime import datetime
from typing import Any

MARKER = b'"publishedAt":"'
ISO_LEN = 24  # 2026-01-02T03:04:05.678Z
BUCKETS_PER_MS = 10
OPEN_TIMEOUT = 600.0  # a stream's response head waits for its replay to be read: 200,000 events take a while
# The chunked-body decoder's states besides "bytes left in this chunk".
_CHUNK_SIZE, _CHUNK_END, _BODY_DONE = -1, -2, -3


class ProbeStream(asyncio.Protocol):
    def __init__(self, request: bytes, *, track_ids: bool = False) -> None:
        self.request = request
        self.receipts: dict[str, float] | None = {} if track_ids else None
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[str | None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.chunked = True
        self.chunk_left = _CHUNK_SIZE
        self.raw = b""
        self.sse = b""
        self.closing = False
        self.server_closed = False
        self.close_error = ""
        self.progress = asyncio.Event()
        self._stamps: dict[bytes, float] = {}
        self.reset()
        self.bytes = 0
        self.last_id = ""
        self.controls: dict[str, int] = {}

    def reset(self) -> None:
        if self.receipts is not None:
            self.receipts = {}
        self.events = 0
        self.hist: dict[int, int] = {}
        self.first_receipt = self.last_receipt = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.bytes += len(data)
        if not self.head.done():
            data, self.raw = self.raw + data, b""
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.raw = data
                return
            self._head(data[:end])
            data = data[end + 4 :]
        payload = self._dechunk(data) if self.chunked else data
        if payload:
            self._payload(payload, now)

    def _dechunk(self, data: bytes) -> bytes:
        """HTTP/1.1 chunked body -> payload bytes, as they arrive (a replay can be one chunk of many MB)."""
        if self.raw:
            data, self.raw = self.raw + data, b""
        out: list[bytes] = []
        pos, size_of = 0, len(data)
        while pos < size_of:
            if self.chunk_left > 0:
                take = min(self.chunk_left, size_of - pos)
                out.append(data[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_left = _CHUNK_END
            elif self.chunk_left == _CHUNK_END:
                if size_of - pos < 2:
                    self.raw = data[pos:]
                    break
                pos += 2
                self.chunk_left = _CHUNK_SIZE
            elif self.chunk_left == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.raw = data[pos:]
                    break
                size = int(data[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                self.chunk_left = size if size else _BODY_DONE
            else:
                break
        return b"".join(out)

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip().lower()
        self.chunked = headers.get(b"transfer-encoding") == b"chunked"
        self.head.set_result(None if self.status == 200 else f"HTTP {self.status}")

    def _payload(self, payload: bytes, now: float) -> None:
        buf = self.sse + payload if self.sse else payload
        last = buf.rfind(b"\n\n")
        if last < 0:
            self.sse = buf
            return
        self.sse = buf[last + 2 :]
        count = 0
        hist = self.hist
        receipts = self.receipts
        for block in buf[:last].split(b"\n\n"):
            if block.startswith(b"id: "):
                self.last_id = block[4 : block.find(b"\n") if b"\n" in block else len(block)].decode()
            i = block.find(MARKER)
            if i >= 0:
                if receipts is not None:
                    receipts[self.last_id] = now
                iso = block[i + len(MARKER) : i + len(MARKER) + ISO_LEN]
                bucket = max(0, int((now * 1000 - self._stamp_ms(iso)) * BUCKETS_PER_MS))
                hist[bucket] = hist.get(bucket, 0) + 1
                count += 1
            elif b"event: " in block:
                start = block.find(b"event: ") + 7
                end = block.find(b"\n", start)
                name = block[start : end if end >= 0 else len(block)].decode(errors="replace")
                self.controls[name] = self.controls.get(name, 0) + 1
        if count:
            self.events += count
            self.first_receipt = self.first_receipt or now
            self.last_receipt = now
            self.progress.set()

    def _stamp_ms(self, iso: bytes) -> float:
        ms = self._stamps.get(iso)
        if ms is None:
            if len(self._stamps) > 100_000:
                self._stamps = {}
            ms = self._stamps[iso] = datetime.fromisoformat(iso.decode()).timestamp() * 1000
        return ms

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.server_closed = True
            self.close_error = repr(exc) if exc else "end of stream"
        if not self.head.done():
            self.head.set_result(f"connection lost before the response head: {exc!r}")
        if not self.lost.done():
            self.lost.set_result(None)
        self.progress.set()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        out = {
            "events": self.events,
            "hist": self.hist,
            "first_receipt": self.first_receipt,
            "last_receipt": self.last_receipt,
            "bytes": self.bytes,
            "last_id": self.last_id,
            "controls": self.controls,
            "open": not self.lost.done(),
            "server_closed": self.server_closed,
            "close_error": self.close_error,
            **({"receipts": self.receipts} if self.receipts is not None else {}),
        }
        if reset:
            self.reset()
        return out


class Probe:
    def __init__(self) -> None:
        self.streams: dict[str, ProbeStream] = {}

    async def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        headers = [
            f"GET {cmd['path']} HTTP/1.1",
            f"Host: {cmd['host']}:{cmd['port']}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
            f"Authorization: Bearer {cmd['token']}",
            "User-Agent: bench-sseprobe",
        ]
        if cmd.get("last_event_id"):
            headers.append(f"Last-Event-ID: {cmd['last_event_id']}")
        request = ("\r\n".join(headers) + "\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        track_ids = bool(cmd.get("track_ids"))
        _, stream = await loop.create_connection(
            lambda: ProbeStream(request, track_ids=track_ids), cmd["host"], cmd["port"]
        )
        self.streams[cmd["name"]] = stream
        try:
            error = await asyncio.wait_for(asyncio.shield(stream.head), OPEN_TIMEOUT)
        except TimeoutError:
            error = f"no response head within {OPEN_TIMEOUT:.0f}s"
        return {"status": stream.status, "refused": error, "seconds": round(time.monotonic() - started, 3)}

    async def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        stream = self.streams[cmd["name"]]
        want, started = int(cmd["events"]), time.monotonic()
        deadline = started + float(cmd.get("timeout", 60))
        idle = float(cmd.get("idle", 10))
        last, last_change = stream.events, time.monotonic()
        while stream.events < want and not stream.lost.done():
            now = time.monotonic()
            if now > deadline or now - last_change > idle:
                break
            stream.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.progress.wait(), 0.25)
            if stream.events != last:
                last, last_change = stream.events, time.monotonic()
        return {"waited": round(time.monotonic() - started, 3), **stream.stats()}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
        if name == "open":
            return await self.open(cmd)
        if name == "wait":
            return await self.wait(cmd)
        stream = self.streams[cmd["name"]]
        if name == "stats":
            return stream.stats(reset=bool(cmd.get("reset")))
        if name == "pause":
            assert stream.transport is not None
            stream.transport.pause_reading()
            return {}
        if name == "resume":
            assert stream.transport is not None
            stream.transport.resume_reading()
            return {}
        if name == "close":
            stream.close()
            await asyncio.wait([stream.lost], timeout=10)
            return stream.stats()
        raise ValueError(f"unknown command {name}")

    def close_all(self) -> None:
        for stream in self.streams.values():
            stream.close()


async def serve() -> None:
    """Answer the parent's commands, each in a task of its own, until `quit` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    probe = Probe()
    tasks: set[asyncio.Task[None]] = set()

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def run(cmd: dict[str, Any]) -> None:
        try:
            reply({"id": cmd["id"], **await probe.handle(cmd), "cpu_s": round(sum(os.times()[:2]), 3)})
        except Exception:
            reply({"id": cmd["id"], "error": traceback.format_exc()})

    reply({"id": 0, "ready": True})
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            task = loop.create_task(run(cmd))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        probe.close_all()


if __name__ == "__main__":
    asyncio.run(serve())
