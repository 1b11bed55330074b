"""A small SSE client over raw asyncio sockets, parsing HTTP/1.1 chunked bodies and SSE fields exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: str
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Block:
    """One blank-line-terminated block: an event, an id-only block, a retry, or comments."""

    fields: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.fields if k == name]
        return values[-1] if values else None


class SSEConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # for non-stream responses
        self._buffer = b""
        self._chunked = False
        self._eof = False
        self._remaining: int | None = None
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self.raw = b""

    async def _read_head(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                self.headers[key.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if self.status != 200 or not self.headers.get("content-type", "").startswith("text/event-stream"):
            if self._chunked:
                while (chunk := await self._read_chunk()) is not None:
                    self.body += chunk
            elif "content-length" in self.headers:
                self.body = await self.reader.readexactly(int(self.headers["content-length"]))

    async def _read_chunk(self) -> bytes | None:
        if not self._chunked:
            if "content-length" in self.headers:  # a whole answer (a retry): it ends there, not at EOF
                if self._remaining is None:
                    self._remaining = int(self.headers["content-length"])
                if self._remaining <= 0:
                    return None
                data = await self.reader.read(min(65536, self._remaining))
                self._remaining -= len(data)
                return data or None
            data = await self.reader.read(65536)
            return data or None
        size_line = await self.reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await self.reader.readuntil(b"\r\n")
            return None
        data = await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return data

    async def next_block(self) -> Block | None:
        """The next SSE block, or None at the end of the stream."""
        while True:
            for sep in (b"\n\n",):
                index = self._buffer.find(sep)
                if index >= 0:
                    raw, self._buffer = self._buffer[:index], self._buffer[index + 2 :]
                    fields = []
                    for line in raw.decode("utf-8").split("\n"):
                        if line.startswith(":"):
                            fields.append(("", line[1:].strip()))
                        elif ":" in line:
                            name, value = line.split(":", 1)
                            fields.append((name, value[1:] if value.startswith(" ") else value))
                        else:
                            fields.append((line, ""))
                    block = Block(fields)
                    if block.get("id") is not None:
                        self.last_event_id = block.get("id")
                    if block.get("retry") is not None:
                        self.retry = int(block.get("retry") or 0)
                    return block
            if self._eof:
                return None
            try:
                chunk = await self._read_chunk()
            except (asyncio.IncompleteReadError, ConnectionError):
                chunk = None
            if chunk is None:
                self._eof = True
                continue
            self.raw += chunk
            self._buffer += chunk

    async def next_event(self, timeout: float = 10) -> SSEEvent | None:
        """The next dispatched event (blocks with data), skipping comments and id-only blocks."""
        async with asyncio.timeout(timeout):
            while True:
                block = await self.next_block()
                if block is None:
                    return None
                data = [v for k, v in block.fields if k == "data"]
                if data:
                    return SSEEvent(block.get("id"), block.get("event") or "message", "\n".join(data))

    async def events(self, count: int, timeout: float = 15) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        async with asyncio.timeout(timeout):
            while len(out) < count:
                event = await self.next_event(timeout)
                if event is None:
                    break
                out.append(event)
        return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> SSEConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_stream(
    base: str,
    *,
    token: str | None = None,
    params: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/api/events/stream",
    method: str = "GET",
    body: bytes = b"",
) -> SSEConnection:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    target = path + ("?" + urlencode(params) if params else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    conn = SSEConnection(reader, writer)
    await conn._read_head()
    return conn
