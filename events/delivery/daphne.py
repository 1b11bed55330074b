"""Everything the gateway does because its server is daphne (Twisted), in one place; wired by
gateway_project/asgi.py with `install()`. The hub, streams and endpoint know nothing of the server.

- Slow clients: ASGI servers accept writes without backpressure, so a client that stops reading would make
  the server's buffer grow without bound. Under daphne the `send` callable is bound to the Twisted request,
  whose transport knows its buffered byte count (`probe_for`); elsewhere there is no probe and only the
  stream's own queue bounds it.
- Writes: Twisted queues every write and sends it on the reactor's next turn, registering the socket for
  writing and unregistering it again (two epoll calls, and daphne's message handling, per event on every
  stream). A stream's body pieces go to the socket at once when nothing is queued before them
  (`TransportProbe.send_now`); what the socket does not take, and everything while anything is queued, goes
  Twisted's way, so order is kept and a slow client still fills the buffer the probe measures.
- Graceful shutdown: SIGTERM/SIGINT first close the open streams with a final `retry:` (clients reconnect to
  another process) and flush audits, then stop the reactor. Twisted alone would cancel the streams at once.
- Logs: daphne writes its access log straight to stdout; with JSON logs it goes through `logging` instead.
- Heap: once the hub runs, what is loaded lives as long as the process and is frozen out of the collector.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import sys
import threading
from datetime import datetime
from typing import Any

from events.delivery import hub

logger = logging.getLogger(__name__)


def install(*, json_access_log: bool) -> None:
    """Adapt the gateway to daphne; call once, from the ASGI module."""
    if json_access_log:
        _route_access_log()
    hub.on_started(_freeze_heap)
    hub.on_started(_take_over_signals)


class TransportProbe:
    """What a stream may ask of its connection: bytes not yet taken by the client, abort, and writing a
    piece of the body straight to the socket."""

    def __init__(self, request: Any, transport: Any) -> None:
        self._request = request
        self._transport = transport
        # A plain TCP connection (not TLS, which has its own layer) that Twisted writes with writeSomeData.
        self._direct = not getattr(transport, "TLS", True) and hasattr(transport, "writeSomeData")

    def send_now(self, chunk: bytes) -> bool:
        """`chunk` as the next piece of the response body, written to the socket now if nothing is queued
        before it (the rest, if the socket takes only part, is queued the usual way). False, having written
        nothing, when the response is not in a state to do so: the caller sends it through daphne."""
        request, t = self._request, self._transport
        if (
            not self._direct
            or not chunk
            or not request.startedWriting
            or request.finished
            or request._disconnected
            or not t.connected
            or t.disconnecting
            or t._writeDisconnected
            or t._tempDataLen
            or len(t.dataBuffer) - t.offset
        ):
            return False
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if request.chunked else chunk
        request.sentLength += len(chunk)
        sent = t.writeSomeData(data)
        if isinstance(sent, BaseException):
            sent = 0  # the connection is gone: queueing the data lets Twisted find out and close it
        if sent < len(data):
            t.write(data[sent:])
        return True

    def buffered(self) -> int | None:
        """Bytes written by the application that the client has not yet taken."""
        t = self._transport
        try:
            return len(t.dataBuffer) - t.offset + t._tempDataLen
        except AttributeError:
            return None

    def abort(self) -> None:
        """Drop the connection and whatever is buffered for it."""
        abort = getattr(self._transport, "abortConnection", None)
        if abort is not None:
            abort()


def probe_for(send: Any) -> TransportProbe | None:
    """The probe for the connection `send` writes to, when the server is daphne; else None."""
    if isinstance(send, functools.partial) and send.args:
        channel = getattr(send.args[0], "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None and hasattr(transport, "dataBuffer"):
            return TransportProbe(send.args[0], transport)
    return None


def _freeze_heap() -> None:
    # Everything loaded so far (Django, the app) lives as long as the process: keep it out of the
    # collector's full passes, which otherwise scan it all every few seconds under load (p99 spikes).
    gc.freeze()
    # Open streams are long-lived objects too. With the default thresholds a full pass ran each time they
    # grew by a quarter: connecting 10,000 streams cost ten passes over a growing heap, a quarter of the
    # web process's CPU (bench/README.md, (c)). A full pass is now considered after 100 passes of the middle
    # generation instead of 10 (the quarter-growth rule still applies), so cyclic garbage that reached the old
    # generation waits longer to be freed: workload (d) checks memory stays flat over connect cycles.
    # The youngest generation is collected every 10,000 allocations instead of 700: opening a stream makes
    # a few hundred objects that live until it opens, and a pass every 700 traced the requests in flight
    # over and over (connecting 10,000 streams: 1.0 s of collection, 0.6 s now; a pass stays well under 1 ms).
    gc.set_threshold(10_000, 10, 100)


_shutdown_tasks: set[asyncio.Task[None]] = set()


def _take_over_signals() -> None:
    """SIGTERM/SIGINT: close streams gracefully, then stop the reactor; a second signal stops it now."""
    if "twisted.internet.reactor" not in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    from twisted.internet import reactor  # noqa: PLC0415 - only under daphne

    loop = asyncio.get_running_loop()
    stopping = False

    async def graceful() -> None:
        try:
            await hub.shutdown_hub()
        finally:
            reactor.stop()  # type: ignore[misc]

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            loop.call_soon_threadsafe(reactor.stop)  # type: ignore[misc]
            return
        stopping = True
        logger.info("signal %d: closing open streams, then stopping", signum)
        loop.call_soon_threadsafe(lambda: _shutdown_tasks.add(loop.create_task(graceful())))

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _route_access_log() -> None:
    """Send daphne's access log through logging, so that with LOG_FORMAT=json every line the web process
    prints is one JSON object."""
    try:
        from daphne.access import AccessLogGenerator  # noqa: PLC0415 - only under daphne
    except ImportError:
        return
    access = logging.getLogger("daphne.access")

    def write_entry(  # noqa: PLR0917 - daphne calls it positionally
        self: AccessLogGenerator,
        host: str,
        date: datetime,
        request: str,
        status: int | None = None,
        length: int | None = None,
        ident: str | None = None,
        user: str | None = None,
    ) -> None:
        access.info("%s %s", request, status, extra={"client": host, "status": status, "length": length})

    AccessLogGenerator.write_entry = write_entry
