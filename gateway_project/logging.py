"""One JSON object per line when LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else was passed through `extra=` and is kept.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def route_daphne_access_log() -> None:
    """Send daphne's access log (which it writes straight to stdout) through logging, so that with
    LOG_FORMAT=json every line the web process prints is one JSON object."""
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
