"""Logging setup (text or JSON lines) and a filter that logs each kind of bad input once."""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["setup_logging", "OncePerKind"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("stream", "topic", "partition", "offset", "reason"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send log lines to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(logging.getLevelName(level), logging.WARNING))


class OncePerKind:
    """Remembers which kinds were logged, so each kind of bad input is logged once and then only counted.

    >>> once = OncePerKind()
    >>> once.first("bad_json"), once.first("bad_json"), once.first("oversize")
    (True, False, True)
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def first(self, kind: str) -> bool:
        """True the first time `kind` is seen."""
        if kind in self._seen:
            return False
        self._seen.add(kind)
        return True
