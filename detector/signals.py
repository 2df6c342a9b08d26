"""The daemon's signals: SIGTERM and SIGINT set its stop flag, SIGHUP its reload flag.

Installed first thing (before torch and the model load, before Kafka is reached), so that a SIGTERM at any
moment of start-up stops the daemon cleanly, with exit status 0. A second SIGINT falls back to Python's
default handler (KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import signal
import threading

__all__ = ["install_signals"]

log = logging.getLogger(__name__)


def install_signals(stop: threading.Event, reload: threading.Event) -> None:
    """Point SIGTERM and SIGINT at `stop` and SIGHUP at `reload` (main thread only)."""

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
        stop.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_hup(_signum: int, _frame: object) -> None:
        reload.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
