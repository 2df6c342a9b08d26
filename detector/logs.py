"""Logging setup (text or JSON lines) and a filter that logs each kind of bad input once."""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["setup_logging", "OncePerKind", "EveryFewMinutes"]


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
    selector = logging.getLogger("kafka.net.selector")
    if not any(isinstance(f, EveryFewMinutes) for f in selector.filters):
        selector.addFilter(EveryFewMinutes("ran for", 600.0))


class EveryFewMinutes(logging.Filter):
    """Lets a log line that contains `marker` through once per `period_s`, with how many were held back since.

    kafka-python's network thread warns each time one of its steps took over 0.1 s ("Task ... ran for 0.116s
    ... blocking the event loop"); under full load, where scoring holds the interpreter lock, that is twice a
    second, and says nothing an operator can act on after the first time.

    >>> f, rec = EveryFewMinutes("ran for", 600.0), logging.LogRecord("k", 30, "", 0, "Task t ran for 0.2s", (), None)
    >>> [f.filter(rec) for _ in range(3)], f.held
    ([True, False, False], 2)
    """

    def __init__(self, marker: str, period_s: float) -> None:
        super().__init__()
        self.marker, self.period_s = marker, period_s
        self.held, self._next = 0, 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        """True to log this record."""
        if self.marker not in record.getMessage():
            return True
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.getMessage()} ({self.held} more like it held back since the last one)"
            record.args = ()
        self.held, self._next = 0, now + self.period_s
        return True


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
