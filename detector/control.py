"""Operators' run-time commands: mute, unmute, acknowledge and label alerts, as read from the control topic.

A command is one JSON object per record of the compacted control topic:
``{"action": "mute" | "unmute" | "ack", "streams": "<stream id or glob>", "until": <RFC 3339 or epoch s>,
"reason": "...", "by": "..."}`` (`until` for mute only; no `until`: muted until unmuted). Its key is
``mute:<glob>`` for mute and unmute, ``ack:<glob>`` for ack, so that compaction keeps the newest mute or
unmute of each glob and, apart, its newest ack (a key of the glob alone would let an ack erase a mute).

Muting follows "the newest command that matches decides": a stream is muted when, of the mute and unmute
commands whose glob matches its id, the newest is a mute whose `until` (wall clock) has not passed. So an
``unmute "pump-*"`` lifts an earlier ``mute "pump-17"``, and a later ``mute "pump-17"`` holds again.
Compaction keeps that answer: it only removes a command that a newer one of the same glob replaced.

A label says what an operator found an alert to be: ``{"action": "label", "streams": "<stream id>",
"alert_id": "...", "as": "false_alarm" | "confirmed", "note": "...", "by": "..."}``, keyed
``label:<alert_id>`` (a later label of the same alert replaces it). Every false alarm of a stream raises that
stream's warning and critical levels by FALSE_ALARM_STEP, at most to FALSE_ALARM_MAX times (Feedback): a
function of the labels held, so reading the topic again from its start gives the same levels.

Which of the two loaded models is live: ``{"action": "promote", "streams": "*", "version": "<model_version>"}``
makes the shadow model (model.shadow) of that version live, the model of model.path its shadow (the
rollback); ``{"action": "rollback", "streams": "*"}`` makes model.path's live again. Both are keyed
``model:*``: the newest decides, at start-up too, and a tombstone under that key is a rollback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase, translate

import numpy as np
import orjson

from detector.rows import grown, step

__all__ = ["ACTIONS", "LABELS", "MODEL_ACTIONS", "Command", "BadCommand", "Mutes", "Feedback", "parse_command",
           "encode_command", "command_key", "deleted", "parse_until", "parse_since", "FALSE_ALARM_STEP",
           "FALSE_ALARM_MAX"]

ACTIONS = ("mute", "unmute", "ack", "label", "promote", "rollback")
LABELS = ("false_alarm", "confirmed")
MODEL_ACTIONS = ("promote", "rollback")
"""Which model is live: `promote` makes the shadow (model.shadow) of the given version live, `rollback` makes
model.path's live again. One key (`model:*`) holds both, so compaction keeps the newest."""
_FIELDS = {"action", "streams", "until", "reason", "by", "alert_id", "as", "note", "version"}
FALSE_ALARM_STEP = 1.25
"""Each alert of a stream labelled a false alarm multiplies that stream's warning and critical levels by this."""
FALSE_ALARM_MAX = 2.0
"""The most the false-alarm labels of one stream raise its levels (x 2: four labels reach it)."""
_MAX_TEXT = 1000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadCommand(ValueError):
    """A control record that is not a valid command: `reason` is its dead-letter reason, the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, frozen=True)
class Command:
    """One operator command; `at` is the wall-clock time it was written (the record's timestamp)."""

    action: str
    streams: str
    until: float | None = None  # mute: wall-clock epoch seconds it ends (None: until unmuted)
    reason: str = ""
    by: str = ""
    at: float = 0.0
    alert_id: str = ""  # label: the alert labelled, what it was found to be, and a note
    label: str = ""
    note: str = ""
    version: str = ""  # promote: the model version made live


def parse_since(value: object, now: float) -> float:
    """Epoch seconds from RFC 3339 text, epoch seconds, or a duration before `now` such as 14d, 36h.

    >>> parse_since("2h", now=10000.0), parse_since("2026-01-01T00:00:00Z", now=0.0)
    (2800.0, 1767225600.0)
    """
    m = _DURATION.match(value.strip()) if isinstance(value, str) else None
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    return parse_until(value)


def parse_until(value: object, now: float | None = None) -> float:
    """Epoch seconds from RFC 3339 text, epoch seconds, or (given `now`) a duration such as 30m, 2h, 1d.

    >>> parse_until("2026-01-01T00:00:00Z"), parse_until(1767225600), parse_until("2h", now=1000.0)
    (1767225600.0, 1767225600.0, 8200.0)
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a time")
    text = value.strip()
    m = _DURATION.match(text)
    if m and now is not None:
        return now + float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not RFC 3339 (e.g. 2026-12-01T10:00:00Z) or epoch seconds"
                         + (", or a duration such as 30m, 2h, 1d" if now is not None else "")) from None
    if ts.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone (add Z for UTC)")
    return ts.timestamp()


def parse_command(value: bytes | None, at: float) -> Command | None:
    """The command in a control record's value (None for a tombstone: see `deleted`); BadCommand if not one.

    >>> c = parse_command(b'{"action": "mute", "streams": "pump-*", "by": "ann"}', at=5.0)
    >>> c.action, c.streams, c.until, c.by, c.at
    ('mute', 'pump-*', None, 'ann', 5.0)
    >>> parse_command(b'{"action": "promote", "streams": "*", "version": "pumps-7"}', at=6.0).version
    'pumps-7'
    """
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadCommand("control_bad_json", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadCommand("control_bad_json", f"a command is a JSON object, not {type(doc).__name__}")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise BadCommand("control_unknown_field", f"unknown field(s) {', '.join(unknown)}; a command has "
                         f"{', '.join(sorted(_FIELDS))}")
    action = doc.get("action")
    if action not in ACTIONS:
        raise BadCommand("control_bad_action", f"action {action!r} is not one of {', '.join(ACTIONS)}")
    streams = doc.get("streams")
    if action in MODEL_ACTIONS and streams != "*":
        raise BadCommand("control_bad_streams", f"{action} is for every stream: streams must be \"*\", not {streams!r}")
    if not isinstance(streams, str) or not streams.strip() or len(streams) > _MAX_TEXT:
        raise BadCommand("control_bad_streams", f"streams {streams!r} is not a stream id or glob (e.g. pump-*)")
    until = None
    if doc.get("until") is not None:
        if action != "mute":
            raise BadCommand("control_bad_until", f"until is for mute only, not {action}")
        try:
            until = parse_until(doc["until"])
        except ValueError as exc:
            raise BadCommand("control_bad_until", f"until: {exc}") from None
    for name in ("reason", "by", "alert_id", "note", "version"):
        v = doc.get(name, "")
        if not isinstance(v, str) or len(v) > _MAX_TEXT:
            raise BadCommand("control_bad_field", f"{name} must be text of at most {_MAX_TEXT} characters")
    if action == "label":
        if not doc.get("alert_id") or doc.get("as") not in LABELS:
            raise BadCommand("control_bad_label", f"a label needs alert_id and as: one of {', '.join(LABELS)}")
    elif any(k in doc for k in ("alert_id", "as", "note")):
        raise BadCommand("control_bad_field", f"alert_id, as and note are for label only, not {action}")
    if action == "promote" and not doc.get("version"):
        raise BadCommand("control_bad_field", "promote needs version: the model_version of the shadow model it makes "
                         "live")
    if action != "promote" and "version" in doc:
        raise BadCommand("control_bad_field", f"version is for promote only, not {action}")
    return Command(action, streams, until, doc.get("reason", ""), doc.get("by", ""), at, doc.get("alert_id", ""),
                   doc.get("as", ""), doc.get("note", ""), doc.get("version", ""))


def deleted(key: bytes | None) -> tuple[str, str] | None:
    """What a tombstone with this key deletes: ("mute", glob), ("ack", glob), ("label", alert id) or ("model", "*");
    None for another key.

    >>> deleted(b"mute:pump-*"), deleted(b"ack:pump-1"), deleted(b"label:a1"), deleted(b"model:*"), deleted(b"p1")
    (('mute', 'pump-*'), ('ack', 'pump-1'), ('label', 'a1'), ('model', '*'), None)
    """
    kind, sep, glob = (key or b"").decode(errors="replace").partition(":")
    return (kind, glob) if sep and kind in ("mute", "ack", "label", "model") and glob else None


def command_key(action: str, streams: str) -> bytes:
    """The record key of a command: mute and unmute of one glob share a key, its ack has another; a label's is
    its alert id (give it as `streams`).

    >>> command_key("unmute", "pump-*"), command_key("ack", "pump-*"), command_key("label", "a1")
    (b'mute:pump-*', b'ack:pump-*', b'label:a1')
    """
    kind = action if action in ("ack", "label") else "model" if action in MODEL_ACTIONS else "mute"
    return f"{kind}:{streams}".encode()


def encode_command(cmd: Command) -> tuple[bytes, bytes]:
    """The key and JSON value of a command, as `detector control` writes it (`at` is the record's timestamp)."""
    doc: dict[str, object] = {"action": cmd.action, "streams": cmd.streams}
    if cmd.until is not None:
        doc["until"] = datetime.fromtimestamp(cmd.until, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    doc.update({"reason": cmd.reason, "by": cmd.by})
    if cmd.action == "label":
        doc.update({"alert_id": cmd.alert_id, "as": cmd.label, "note": cmd.note})
        return command_key("label", cmd.alert_id), orjson.dumps(doc)
    if cmd.action == "promote":
        doc["version"] = cmd.version
    return command_key(cmd.action, cmd.streams), orjson.dumps(doc)


class Feedback:
    """The operators' labels of alerts seen so far, and what they do to each stream's levels.

    >>> fb = Feedback()
    >>> for i in range(5):
    ...     fb.apply(Command("label", "pump-1", alert_id=f"a{i}", label="false_alarm"))
    >>> fb.apply(Command("label", "pump-2", alert_id="b", label="confirmed"))
    >>> fb.factors(["pump-1", "pump-2", "pump-3"]).tolist()
    [2.0, 1.0, 1.0]
    >>> fb.forget("a4"); fb.forget("a3"); fb.factors(["pump-1"]).tolist()  # three left: 1.25 ** 3
    [1.953125]
    """

    def __init__(self) -> None:
        self.labels: dict[str, tuple[str, str]] = {}  # alert id: (stream, label)
        self._false: dict[str, int] = {}  # stream: alerts labelled false alarms

    def apply(self, cmd: Command) -> None:
        """Hold a label (a later one of the same alert replaces it)."""
        self.forget(cmd.alert_id)
        self.labels[cmd.alert_id] = (cmd.streams, cmd.label)
        if cmd.label == "false_alarm":
            self._false[cmd.streams] = self._false.get(cmd.streams, 0) + 1

    def forget(self, alert_id: str) -> None:
        """Drop the label of this alert (its key was deleted from the topic)."""
        old = self.labels.pop(alert_id, None)
        if old is not None and old[1] == "false_alarm":
            self._false[old[0]] -= 1
            if not self._false[old[0]]:
                del self._false[old[0]]

    def factors(self, streams: list[str]) -> np.ndarray:
        """What each stream's levels are multiplied by: FALSE_ALARM_STEP per false alarm, at most FALSE_ALARM_MAX."""
        n = np.array([self._false.get(s, 0) for s in streams], np.float64) if self._false else np.zeros(len(streams))
        return np.minimum(FALSE_ALARM_STEP**n, FALSE_ALARM_MAX)

    @property
    def any_false(self) -> bool:
        """Whether any stream has a false-alarm label (else every factor is 1)."""
        return bool(self._false)


class Mutes:
    """Which streams are muted at a wall-clock time, from the mute and unmute commands seen so far.

    Each glob is one rule (a newer command of the same glob replaces it); per stream row the matches of every
    rule are computed once (when the row or the rule appears), so a batch costs a few array operations.

    >>> names = ["pump-1", "pump-2", "fan-1"]
    >>> m = Mutes(names)
    >>> m.apply(Command("mute", "pump-*", until=100.0))
    >>> m.apply(Command("unmute", "pump-2"))
    >>> m.muted(np.array([0, 1, 2]), now=50.0).tolist(), m.muted(np.array([0]), now=150.0).tolist()
    ([True, False, False], [False])
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names  # the engine's stream ids by row (grows as streams appear)
        self.rules: dict[str, Command] = {}  # glob -> newest mute or unmute command of it
        self._order = np.zeros(0, np.int64)  # per rule (column): when it was last set, newest highest
        self._mute = np.zeros(0, bool)
        self._until = np.zeros(0)
        self._member = np.zeros((0, 0), bool)  # (capacity, rules): does row r's stream match rule j
        self._known = np.zeros(0, bool)  # per row: its matches are computed (for the stream it holds now)
        self._tick = 0

    def apply(self, cmd: Command) -> None:
        """Take a mute or unmute command: it replaces the rule of its glob and becomes the newest."""
        self._tick += 1
        if cmd.streams in self.rules:
            j = list(self.rules).index(cmd.streams)
        else:
            j = len(self.rules)
            match = re.compile(translate(cmd.streams)).match
            column = np.zeros((len(self._member), 1), bool)
            known = np.flatnonzero(self._known)
            column[known, 0] = np.fromiter((match(self.names[r]) is not None for r in known.tolist()), bool,
                                           len(known))
            self._member = np.concatenate([self._member, column], axis=1)
            self._order, self._mute, self._until = (np.concatenate([a, np.zeros(1, a.dtype)])
                                                    for a in (self._order, self._mute, self._until))
        self.rules[cmd.streams] = cmd
        self._order[j] = self._tick
        self._mute[j] = cmd.action == "mute"
        self._until[j] = np.inf if cmd.until is None else cmd.until

    def forget(self, glob: str) -> None:
        """Drop the rule of this glob (its key was deleted from the topic), as if it had never been set."""
        if glob not in self.rules:
            return
        j = list(self.rules).index(glob)
        del self.rules[glob]
        self._member = np.delete(self._member, j, axis=1)
        self._order, self._mute, self._until = (np.delete(a, j) for a in (self._order, self._mute, self._until))

    def _members(self, rows: np.ndarray) -> np.ndarray:
        need = int(rows.max()) + 1 if len(rows) else 0
        if need > len(self._member):  # grown by a quarter at a time, not copied for every new stream
            cap = max(need, step(len(self._member)))
            self._member, self._known = grown(self._member, cap, False), grown(self._known, cap, False)
        todo = np.unique(rows[~self._known[rows]]) if len(rows) else rows
        if len(todo):
            globs = list(self.rules)
            self._member[todo] = np.array([[fnmatchcase(self.names[r], g) for g in globs] for r in todo.tolist()],
                                          bool).reshape(-1, len(globs))
            self._known[todo] = True
        return self._member[rows]

    def forget_rows(self, rows: np.ndarray) -> None:
        """These rows' streams are gone: their matches are computed again for the next stream a row holds."""
        self._known[rows[rows < len(self._known)]] = False

    def muted(self, rows: np.ndarray, now: float) -> np.ndarray:
        """(K,) True where the stream of the row is muted at wall-clock time `now`."""
        if not self.rules or not len(rows):
            return np.zeros(len(rows), bool)
        order = np.where(self._members(rows), self._order, -1)
        newest = order.argmax(axis=1)
        return (order.max(axis=1) >= 0) & self._mute[newest] & (self._until[newest] > now)

    def count(self, now: float, rows: np.ndarray | None = None) -> int:
        """How many of the streams held (or of these rows) are muted now."""
        held = np.flatnonzero(np.fromiter(map(bool, self.names), bool, len(self.names)))  # "": a released row
        return int(self.muted(held if rows is None else rows, now).sum())

    def matching(self, glob: str) -> np.ndarray:
        """Rows of the streams held whose id matches `glob`."""
        match = re.compile(translate(glob)).match
        return np.flatnonzero(np.fromiter((bool(n) and match(n) is not None for n in self.names), bool,
                                          len(self.names)))
