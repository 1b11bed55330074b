"""The web process (daphne): who may open a stream, which events each stream gets, and the bytes on the socket.

Durable events are read from the store by the hub and handed to streams; streams write SSE frames and
report what they did to the audit writer. Server specifics (daphne, Twisted) live in `daphne.py` alone.
"""
