"""Stream labels: operators name groups of streams (kind: pump, site: north) and select streams by them.

Labels are assigned in YAML by glob on the stream id (`streams.labels`); every matching entry adds its labels,
a later entry overriding an earlier one for the same name. A selector (a threshold override, a maintenance
window) matches a stream by a glob on its id, by labels (all the given pairs must be equal), or by both.
Selectors are resolved once per stream, when it first appears, and again when the configuration is reloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol

__all__ = ["Labeler", "StreamMatch"]


class _Assignment(Protocol):
    streams: str
    labels: dict[str, str]


class Labeler:
    """The labels of a stream id, from the `streams.labels` entries whose glob matches it.

    >>> lab = Labeler([{"streams": "pump-*", "labels": {"kind": "pump", "site": "north"}},
    ...                {"streams": "pump-9*", "labels": {"site": "south"}}])
    >>> lab("pump-12"), lab("pump-91"), lab("fan-1")
    ({'kind': 'pump', 'site': 'north'}, {'kind': 'pump', 'site': 'south'}, {})
    """

    def __init__(self, entries: Sequence[_Assignment | Mapping[str, object]] = ()) -> None:
        self.entries: list[tuple[str, dict[str, str]]] = []
        for e in entries:
            glob, labels = (e["streams"], e["labels"]) if isinstance(e, Mapping) else (e.streams, e.labels)
            self.entries.append((str(glob), {str(k): str(v) for k, v in dict(labels).items()}))

    def __call__(self, stream: str) -> dict[str, str]:
        """The merged labels of every entry whose glob matches `stream`."""
        out: dict[str, str] = {}
        for glob, labels in self.entries:
            if fnmatchcase(stream, glob):
                out.update(labels)
        return out


@dataclass(frozen=True, slots=True)
class StreamMatch:
    """Selects streams by a glob on the id (None: any id) and by labels (all the given pairs must be equal).

    >>> m = StreamMatch("pump-*", {"site": "north"})
    >>> north = {"site": "north"}
    >>> m.matches("pump-1", {**north, "kind": "pump"}), m.matches("pump-1", {}), m.matches("fan-1", north)
    (True, False, False)
    """

    streams: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def matches(self, stream: str, labels: Mapping[str, str]) -> bool:
        """Whether a stream with this id and these labels is selected."""
        if self.streams is not None and not fnmatchcase(stream, self.streams):
            return False
        return all(labels.get(k) == v for k, v in self.labels.items())
