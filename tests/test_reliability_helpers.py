"""The failure tests' log check: kafka-python's own reports of dropped connections pass, anything else fails."""

from __future__ import annotations

from tests.reliability import daemon_tracebacks


def report(head: str, *body: str) -> str:
    return "\n".join(["2026-11-25 22:56:35,147 " + head, "Traceback (most recent call last):",
                      '  File "x.py", line 1, in f', "    f()", *body, "2026-11-25 22:56:36,000 INFO next line"])


def test_kafka_pythons_reports_of_dropped_connections_are_not_daemon_failures() -> None:
    known = [
        report("ERROR kafka.net.transport: Error receiving network data closing socket",
               "ConnectionResetError: [Errno 104] Connection reset by peer"),
        report("ERROR kafka.net.transport: Error receiving network data closing socket",
               "AttributeError: 'NoneType' object has no attribute 'recv'"),
        report("ERROR kafka.net.connection: Failed to build connection log_prefix",
               "OSError: [Errno 107] Transport endpoint is not connected"),
    ]
    for text in known:
        assert daemon_tracebacks(text) == [], text


def test_any_other_traceback_is_reported() -> None:
    others = [
        report("ERROR detector.daemon: batch failed", "ValueError: bad"),
        report("ERROR kafka.net.connection: Failed to build connection log_prefix", "ValueError: something else"),
        report("ERROR detector.daemon: batch failed", "OSError: [Errno 107] Transport endpoint is not connected"),
    ]
    for text in others:
        assert len(daemon_tracebacks(text)) == 1, text
