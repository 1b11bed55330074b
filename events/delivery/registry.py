"""Which open streams of this web process want which sources: the registry. No I/O.

A stream reads its user's source, the broadcast source and one source per followed process instance
(routing.Keyspace.sources_for). The registry maps each source to the streams reading it, and tells its
listener when a source gains its first stream (subscribe to its channel) or loses its last (unsubscribe):
a web process hears exactly the sources its own streams need, whatever else flows through the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from events.core.routing import Source


class Reader(Protocol):
    """What the registry needs of a stream: its sources; `offer` is called with each live event."""

    @property
    def sources(self) -> Iterable[Source]: ...


class Registry:
    def __init__(
        self,
        *,
        on_first: Callable[[Source], None] = lambda _: None,
        on_last: Callable[[Source], None] = lambda _: None,
    ) -> None:
        self._by_source: dict[Source, set[Reader]] = {}
        self._sources_of: dict[Reader, set[Source]] = {}
        self._on_first = on_first
        self._on_last = on_last

    def __len__(self) -> int:
        return len(self._sources_of)

    def __contains__(self, reader: object) -> bool:
        return reader in self._sources_of

    def readers(self) -> list[Reader]:
        return list(self._sources_of)

    def sources(self) -> list[Source]:
        """Every source some stream reads."""
        return list(self._by_source)

    def readers_of(self, source: Source) -> set[Reader]:
        """The streams reading `source` (the registry's own set: do not change it)."""
        return self._by_source.get(source, _NONE)

    def add(self, reader: Reader) -> None:
        sources = set(reader.sources)
        self._sources_of[reader] = sources
        for source in sources:
            self._join(reader, source)

    def remove(self, reader: Reader) -> None:
        for source in self._sources_of.pop(reader, ()):
            self._leave(reader, source)

    def drop_source(self, reader: Reader, source: Source) -> None:
        """`reader` stops reading `source` (it no longer follows that process instance)."""
        sources = self._sources_of.get(reader)
        if sources is not None and source in sources:
            sources.discard(source)
            self._leave(reader, source)

    def _join(self, reader: Reader, source: Source) -> None:
        readers = self._by_source.get(source)
        if readers is None:
            readers = self._by_source[source] = set()
            self._on_first(source)
        readers.add(reader)

    def _leave(self, reader: Reader, source: Source) -> None:
        readers = self._by_source.get(source)
        if readers is None:
            return
        readers.discard(reader)
        if not readers:
            del self._by_source[source]
            self._on_last(source)


_NONE: set[Reader] = set()
