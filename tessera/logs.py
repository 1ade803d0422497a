"""Structured logging: JSON lines when not on a terminal, ``key=value`` text on one.

Log an event name plus fields: ``log.info("envelope.stored", extra=fields(size=412))``. Never log a
survivor field, a key, a token or a passphrase (STYLE.md habit 8); log ids, sizes and outcomes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_FIELDS = "tessera_fields"


def fields(**values: Any) -> dict[str, Any]:
    """Wrap structured fields for ``extra=`` so they survive logging's record plumbing."""
    return {_FIELDS: values}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, sort_keys=False)


class TextFormatter(logging.Formatter):
    """Readable single lines for a person watching a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, _FIELDS, {})
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower():<7} {record.name}: {record.getMessage()}"
        return f"{line} {tail}".rstrip()


def configure(fmt: str = "auto", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Install one handler on the root logger. ``fmt`` is ``json``, ``text`` or ``auto``."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if out.isatty() else "json"
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
