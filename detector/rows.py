"""Per-stream state lives in arrays with one row per stream; this grows them as streams appear."""

from __future__ import annotations

import numpy as np

__all__ = ["grown", "needed"]


def grown(a: np.ndarray, capacity: int, fill: object = 0) -> np.ndarray:
    """`a` with its first axis extended to `capacity` rows, the new rows set to `fill` (`a` if already long enough).

    >>> grown(np.array([[1, 2]]), 3, fill=7).tolist()
    [[1, 2], [7, 7], [7, 7]]
    """
    if len(a) >= capacity:
        return a
    out = np.full((capacity, *a.shape[1:]), fill, a.dtype)
    out[: len(a)] = a
    return out


def needed(rows: np.ndarray, have: int) -> int:
    """The capacity to grow to so that every row in `rows` fits: 0 when it already does, else doubling."""
    need = int(rows.max()) + 1 if len(rows) else 0
    return max(need, 2 * have) if need > have else 0
