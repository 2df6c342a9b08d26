"""Per-stream state lives in arrays with one row per stream; this grows them as streams appear."""

from __future__ import annotations

import numpy as np

__all__ = ["grown", "needed", "step", "take"]


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


def step(have: int) -> int:
    """The next capacity after `have` rows: a quarter more (at least 256), so that unused rows stay few.

    >>> step(0), step(1000), step(100000)
    (256, 1256, 125000)
    """
    return have + max(have // 4, 256)


def needed(rows: np.ndarray, have: int) -> int:
    """The capacity to grow to so that every row in `rows` fits: 0 when it already does, else one step or more."""
    need = int(rows.max()) + 1 if len(rows) else 0
    return max(need, step(have)) if need > have else 0


def take(a: np.ndarray, rows: np.ndarray, fill: object = 0) -> np.ndarray:
    """`a[rows]`, with `fill` for rows beyond the end of `a` (streams it has not seen yet).

    >>> take(np.array([5, 6]), np.array([1, 3]), fill=-1).tolist()
    [6, -1]
    """
    out = np.full((len(rows), *a.shape[1:]), fill, a.dtype)
    inside = rows < len(a)
    out[inside] = a[rows[inside]]
    return out


class RowState:
    """Per-stream state held in numpy arrays, one row per stream: exported and imported by row (checkpoints)."""

    def row_fields(self) -> dict[str, object]:
        """Name of each per-stream array attribute, with the value of a fresh row."""
        return {}

    def export_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The state of these streams, one array per field, rows first."""
        return {name: take(getattr(self, name), rows, fill) for name, fill in self.row_fields().items()}

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set these streams' state (None: fresh); return the fields that did not fit.

        All or nothing: when one field is missing or has another shape (a policy with another history length,
        say), every field of these rows starts fresh, so that no row is left half restored.
        """
        fields = self.row_fields()
        for name, fill in fields.items():
            a = getattr(self, name)
            cap = needed(rows, len(a))
            if cap:
                setattr(self, name, grown(a, cap, fill))
        misfit = [] if state is None else [
            name for name in fields
            if state.get(name) is None or state[name].shape != (len(rows), *getattr(self, name).shape[1:])]
        for name, fill in fields.items():
            a = getattr(self, name)
            a[rows] = fill if state is None or misfit else state[name]
        return misfit
