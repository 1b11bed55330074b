"""Lets a stream see how much of what it wrote is still waiting in the server's socket buffer.

ASGI servers accept writes without backpressure, so a client that stops reading would make the
server buffer grow without bound. Under daphne the `send` callable is bound to the Twisted request,
whose transport knows its buffered byte count; elsewhere the probe is absent and only the stream's own
queue bounds it.
"""

from __future__ import annotations

import functools
from typing import Any


class TransportProbe:
    def __init__(self, transport: Any) -> None:
        self._transport = transport

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
            return TransportProbe(transport)
    return None
