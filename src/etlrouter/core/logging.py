"""Structured logging: human-readable text on a terminal, one JSON object per line in containers.

Modules log with the standard library (`logging.getLogger(__name__)`); structured fields go in
`extra={"fields": {...}}` and appear as `key=value` in text and as top-level keys in JSON.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from etlrouter.core import tracing

_json = msgspec.json.Encoder()
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "fields"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
    for key, value in record.__dict__.items():
        if key not in _STANDARD_ATTRS:
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # A line logged while a span is current names it, so a log line leads to its trace.
        ids = tracing.current_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in _fields(record).items():
            entry[key if key not in entry else f"field_{key}"] = value  # never shadow the base keys
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _json.encode(entry).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname[0]} {self.role} {record.name}: {record.getMessage()}"
        if extra:
            line += "  " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(role: str, level: str = "info", fmt: str = "auto") -> None:
    """Configure the root logger once per process (idempotent: replaces earlier handlers)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if use_json else TextFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every frame or connection at debug level drown ours.
    for noisy in ("hpack", "h2", "grpclib.protocol", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
