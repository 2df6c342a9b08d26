"""Writing a benchmark's results into its own section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["machine", "replace_section"]


def machine() -> str:
    """The machine a benchmark ran on, as its results name it: host (architecture, cores)."""
    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"


def replace_section(path: str | Path, key: str, title: str, body: str) -> None:
    """Put `body` between the `bench:<key>` markers of the markdown file, adding a `title` section if missing."""
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    text = Path(path).read_text()
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    Path(path).write_text(head + begin + body + end + tail)
