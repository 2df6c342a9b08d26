"""The freed heap goes back to the system: the step growth the hour soak showed at each rebalance."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from detector.heap import release_free_heap


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_freed_blocks_between_live_ones_go_back_to_the_system() -> None:
    if not Path("/proc/self/status").exists() or not release_free_heap():
        pytest.skip("needs Linux with glibc (malloc_trim); elsewhere release_free_heap does nothing")
    blocks = [bytes(2000) for _ in range(100_000)]  # 200 MB in blocks malloc serves from its heap
    kept = blocks[::50]  # every fiftieth stays: no free stretch at the heap's top to give back on its own
    del blocks
    gc.collect()
    before = _rss()
    assert release_free_heap()
    after = _rss()
    assert before - after > 100 * 2**20, (before, after)
    assert len(kept) == 2000
