"""Operators' commands without Kafka: parsing, mute and unmute, ack, checkpoints and reload keep them."""

from __future__ import annotations

import logging

import numpy as np
import orjson
import pytest

from consumers.base import Record
from consumers.memory import IterSource, ListSink
from detector.alert import AlertMachine
from detector.config import AlertConfig, parse_config
from detector.control import BadCommand, Command, Mutes, encode_command, parse_command, parse_until
from detector.daemon import Daemon
from detector.pipeline import Pipeline
from tests.helpers import FEATURES, random_artifact, sine_values

T0 = 1_700_000_000.0
NOW = 2e9  # the wall clock the tests run at
SRC = {"topic": "ctl", "partition": 0, "offset": 0}
RULES = {"thresholds": {"policy": "static", "static": {"warning": 5, "critical": 60}},
         "alerts": {"k": 2, "n": 3, "clear_after": 2}}


def readings(t0: int, t1: int, streams: int = 3) -> list[Record]:
    """Readings t0..t1 of m0..m2; m1's pressure is shifted by 2.5 from t=100 (warning) and by 10 from 200
    (critical), back to normal from 300."""
    out = []
    for t in range(t0, t1):
        for s in range(streams):
            v = sine_values(1000, seed=500 + s, phase=3 * s)[t].astype(float)
            if s == 1:
                v[2] += 2.5 if 100 <= t < 200 else 10.0 if 200 <= t < 300 else 0.0
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v.tolist(), strict=True))}
            out.append(Record("in", s % 3, t * streams + s, f"m{s}".encode(), orjson.dumps(body), 0))
    return out


def anomalies(out: object) -> list[tuple[str, str]]:
    return [(a["stream"], a["state"]) for a in out.alerts if a["kind"] == "anomaly"]  # type: ignore[attr-defined]


@pytest.fixture
def pipe() -> Pipeline:
    return Pipeline(parse_config(RULES), random_artifact())


def test_commands_parse_and_bad_ones_name_their_reason() -> None:
    cmd = parse_command(b'{"action": "mute", "streams": "pump-*", "until": "2030-01-01T00:00:00Z", '
                        b'"reason": "bearing swap", "by": "ann"}', at=5.0)
    assert cmd == Command("mute", "pump-*", 1893456000.0, "bearing swap", "ann", 5.0)
    assert parse_command(None, at=1.0) is None, "a tombstone is no command"
    key, value = encode_command(cmd)
    assert key == b"mute:pump-*" and parse_command(value, at=5.0) == cmd
    assert encode_command(Command("ack", "pump-1"))[0] == b"ack:pump-1"
    promote = Command("promote", "*", by="ann", at=5.0, version="pumps-7")
    key, value = encode_command(promote)
    assert key == b"model:*" and parse_command(value, at=5.0) == promote
    assert encode_command(Command("rollback", "*"))[0] == b"model:*", "one key: the newest decides"
    for raw, reason in [(b"{oops", "control_bad_json"), (b"[1]", "control_bad_json"),
                        (b'{"action": "silence", "streams": "x"}', "control_bad_action"),
                        (b'{"action": "mute"}', "control_bad_streams"),
                        (b'{"action": "mute", "streams": ""}', "control_bad_streams"),
                        (b'{"action": "mute", "streams": "x", "until": "tomorrow"}', "control_bad_until"),
                        (b'{"action": "ack", "streams": "x", "until": 5}', "control_bad_until"),
                        (b'{"action": "ack", "streams": "x", "by": 7}', "control_bad_field"),
                        (b'{"action": "mute", "streams": "x", "util": 5}', "control_unknown_field"),
                        (b'{"action": "promote", "streams": "*"}', "control_bad_field"),
                        (b'{"action": "promote", "streams": "pump-1", "version": "v2"}', "control_bad_streams"),
                        (b'{"action": "rollback", "streams": "*", "version": "v2"}', "control_bad_field"),
                        (b'{"action": "mute", "streams": "x", "version": "v2"}', "control_bad_field")]:
        with pytest.raises(BadCommand) as err:
            parse_command(raw, at=0.0)
        assert err.value.reason == reason, raw
    assert parse_until("90m", now=100.0) == 5500.0
    with pytest.raises(ValueError, match="no time zone"):
        parse_until("2030-01-01T00:00:00")


def test_the_newest_matching_mute_or_unmute_decides() -> None:
    names = ["pump-1", "pump-2", "fan-1"]
    m = Mutes(names)
    rows = np.arange(3)
    m.apply(Command("mute", "pump-1"))
    m.apply(Command("unmute", "pump-*"))
    assert m.muted(rows, NOW).tolist() == [False, False, False]
    m.apply(Command("mute", "pump-1"))  # the same glob again: it is now the newest
    assert m.muted(rows, NOW).tolist() == [True, False, False]
    m.apply(Command("mute", "*", until=NOW + 10))
    assert m.muted(rows, NOW).tolist() == [True, True, True]
    assert m.muted(rows, NOW + 10).tolist() == [False, False, False], "an expired mute mutes nothing"
    names.append("fan-2")  # a stream that appears later is matched too
    assert m.muted(np.array([3]), NOW).tolist() == [True] and m.count(NOW) == 4


def test_mute_clears_the_open_episode_and_silences_until_unmuted(pipe: Pipeline) -> None:
    assert anomalies(pipe.process(readings(0, 150), NOW)) == [("m1", "raised")]
    raised = [a for a in pipe.process([], NOW).alerts]
    assert raised == []
    assert pipe.command(Command("mute", "m1", reason="known fault", by="ann"), SRC) == ([], 1)
    out = pipe.process(readings(150, 250), NOW)
    clear = [a for a in out.alerts if a["kind"] == "anomaly"]
    assert [(a["stream"], a["state"], a["reason"]) for a in clear] == [("m1", "cleared", "muted")], \
        "one clear for the open episode, then silence: no escalation though m1 is critical now"
    n_learned = pipe.threshold.export_rows(np.array([1]))
    assert pipe.command(Command("unmute", "m*"), SRC) == ([], 3)
    out = pipe.process(readings(250, 290), NOW)
    assert anomalies(out) == [("m1", "raised")], "alerts come back after the unmute"
    assert out.alerts[0]["severity"] == "critical"
    assert out.alerts[0]["alert_id"] != clear[0]["alert_id"], "a new episode"
    assert n_learned.keys() == pipe.threshold.export_rows(np.array([1])).keys()


def test_a_mute_ends_at_its_until_by_the_wall_clock(pipe: Pipeline) -> None:
    pipe.command(Command("mute", "m1", until=NOW + 3600), SRC)
    assert anomalies(pipe.process(readings(0, 180), NOW)) == []
    assert anomalies(pipe.process(readings(180, 200), NOW + 3600)) == [("m1", "raised")]


def test_ack_is_one_record_for_the_open_episode_then_no_escalation(pipe: Pipeline) -> None:
    out = pipe.process(readings(0, 150), NOW)
    raised = out.alerts[0]
    assert pipe.command(Command("ack", "m0", at=NOW), SRC) == ([], 1), "no open episode: nothing happens"
    acks, matched = pipe.command(Command("ack", "m*", reason="on it", by="bob", at=NOW + 1), SRC)
    assert matched == 3 and len(acks) == 1
    ack = acks[0]
    assert (ack["alert_id"], ack["stream"], ack["state"], ack["severity"]) == (raised["alert_id"], "m1",
                                                                            "acknowledged", "warning")
    assert (ack["reason"], ack["by"], ack["input"], ack["first_seen"]) == ("on it", "bob", SRC,
                                                                          raised["first_seen"])
    assert pipe.command(Command("ack", "m1", at=NOW + 2), SRC)[0] == [], "an episode is acknowledged once"
    assert anomalies(pipe.process(readings(150, 300), NOW)) == [], "the escalation is not announced"
    cleared = [a for a in pipe.process(readings(300, 400), NOW).alerts if a["kind"] == "anomaly"]
    assert [(a["state"], a["severity"], a["alert_id"]) for a in cleared] == [
        ("cleared", "critical", raised["alert_id"])], "the clear is, with the episode's id"
    assert anomalies(pipe.process(readings(100, 200) and readings(400, 420), NOW)) == []


def test_unacknowledged_episodes_escalate(pipe: Pipeline) -> None:
    pipe.process(readings(0, 150), NOW)
    assert anomalies(pipe.process(readings(150, 300), NOW)) == [("m1", "escalated")]


def test_ack_state_is_checkpointed_and_an_ack_is_applied_again_after_a_restore(pipe: Pipeline) -> None:
    pipe.process(readings(0, 150), NOW)
    rows = np.arange(3)
    before = pipe.export_rows(rows)
    pipe.take_dirty()  # a commit
    acks, _ = pipe.command(Command("ack", "m1", at=NOW + 5), SRC)
    after = pipe.export_rows(rows)
    assert after["alerts.acked"].tolist() == [0, 1, 0] and after["alerts.raised_wall"][1] == NOW
    assert pipe.take_dirty().tolist() == [1], "the ack is checkpointed at the next commit"
    pipe.import_rows(rows, after)
    assert pipe.reapply_acks() == [], "restored acknowledged: nothing again"
    pipe.import_rows(rows, before)  # a checkpoint written before the ack reached it
    again = pipe.reapply_acks()
    assert [(a["alert_id"], a["state"]) for a in again] == [(acks[0]["alert_id"], "acknowledged")]
    old = {k: v for k, v in before.items() if k not in ("alerts.acked", "alerts.raised_wall")}
    assert pipe.import_rows(rows, old) == [], "a checkpoint from before acks existed still fits"
    assert pipe.alerts.state[1] > 0 and pipe.alerts.acked[1] == 0
    assert anomalies(pipe.process(readings(150, 300), NOW)) == [("m1", "escalated")]


def test_an_ack_does_not_reach_an_episode_raised_after_it_was_written() -> None:
    m = AlertMachine(AlertConfig(k=1, n=1), capacity=2)
    m.update(np.array([0, 1]), np.array([1.0, 1.0]), np.array([11.0, 11.0]), np.full(2, 10.0), np.full(2, 99.0),
             now=100.0)
    assert m.acknowledge(np.array([0, 1]), written_at=99.0).tolist() == []
    assert m.acknowledge(np.array([0, 1]), written_at=100.0).tolist() == [0, 1]


def test_mutes_and_acks_survive_a_reload(pipe: Pipeline) -> None:
    pipe.process(readings(0, 150), NOW)
    pipe.command(Command("ack", "m1", at=NOW), SRC)
    pipe.command(Command("mute", "m2"), SRC)
    changes = pipe.reconfigure(parse_config({**RULES, "alerts": {**RULES["alerts"], "clear_after": 3},
                                             "control": {"topic": "other"}}))
    assert changes == ["control (takes effect after a restart)", "alerts"]
    assert pipe.alerts.acked[1] == 1 and pipe.mutes.muted(np.arange(3), NOW).tolist() == [False, False, True]
    assert anomalies(pipe.process(readings(150, 300), NOW)) == []


def control_record(offset: int, value: bytes, ts_ms: int = int(NOW * 1000)) -> Record:
    return Record("ctl", 0, offset, b"k", value, ts_ms)


def test_the_daemon_applies_commands_between_batches_and_sends_bad_ones_to_the_dead_letter_topic(
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config(RULES)
    control = IterSource([control_record(0, b'{"action": "mute", "streams": "m2", "by": "ann"}'),  # at start-up
                          control_record(1, b'{"action": "mute", "streams": "m2"')], batch_size=2)
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()), control=control)
    src, sink = IterSource(readings(0, 150), batch_size=10_000), ListSink()
    history = control.poll_batch(0)
    daemon.apply_control(history, sink, history=True)
    assert sink.pending == [], "a bad command read at start-up was reported when it arrived"
    assert list(daemon.pipeline.mutes.rules) == ["m2"]
    control = IterSource([control_record(2, b'{"action": "ack", "streams": "m1", "by": "bob"}'),
                          control_record(3, b'{"action": "mute", "streams": "m2", "util": 1}'),
                          control_record(4, b'{"action": "mute", "streams": "m2", "util": 2}')])
    daemon.control = control
    daemon.process(src.poll_batch(0), src, sink)
    caplog.set_level(logging.INFO, logger="detector.daemon")
    daemon._follow_control(sink)
    daemon.commit(src, sink)
    acks = [orjson.loads(r.value) for r in sink.on(cfg.output.alerts_topic)]
    assert [(a["stream"], a["by"]) for a in acks if a["state"] == "acknowledged"] == [("m1", "bob")]
    dead = sink.on(cfg.output.dead_letter_topic)
    assert [dict(r.headers)["reason"] for r in dead] == [b"control_unknown_field"] * 2
    assert dict(dead[0].headers)["source"] == b"ctl[0]@3"
    assert dead[0].value == b'{"action": "mute", "streams": "m2", "util": 1}', "the original bytes"
    assert caplog.text.count("rejected control command ctl[0]@3: control_unknown_field") == 1
    assert "rejected control command ctl[0]@4" not in caplog.text, "logged once per kind"
    assert "control: ack m1 by bob (no reason): 1 open episodes acknowledged" in caplog.text
    metrics = daemon.metrics.render().decode()
    assert 'detector_control_commands_total{action="invalid"} 3.0' in metrics
    assert 'detector_control_commands_total{action="ack"} 1.0' in metrics
    assert 'detector_muted_streams 1.0' in metrics
    daemon.apply_control([Record("ctl", 0, 5, b"mute:m2", None, 0)], sink)  # a tombstone
    assert daemon.pipeline.mutes.rules == {} and sink.pending == []


def test_a_deleted_key_forgets_its_command() -> None:
    m = Mutes(["pump-1", "pump-2"])
    m.apply(Command("mute", "pump-*"))
    m.apply(Command("unmute", "pump-1"))
    m.apply(Command("mute", "pump-2", until=NOW + 5))
    m.forget("pump-1")  # a tombstone under mute:pump-1
    assert m.muted(np.arange(2), NOW).tolist() == [True, True] and list(m.rules) == ["pump-*", "pump-2"]
    m.forget("pump-*")
    m.forget("nothing")
    assert m.muted(np.arange(2), NOW).tolist() == [False, True]


class GroupMember(IterSource):
    """An in-memory source that holds some partitions of a consumer group's input."""

    grouped = True

    def __init__(self, partitions: set[tuple[str, int]]) -> None:
        super().__init__([])
        self.partitions = partitions

    def assignment(self) -> set[tuple[str, int]]:
        return self.partitions


def test_one_member_of_the_group_dead_letters_a_bad_command() -> None:
    cfg = parse_config(RULES)
    bad = control_record(0, b'{"action": "mute", "streams": "m2"')
    sent = []
    for partitions in ({(cfg.input.topics[0], 1)}, {(cfg.input.topics[0], 0), (cfg.input.topics[0], 2)}, set()):
        daemon = Daemon(cfg, Pipeline(cfg, random_artifact()))
        sink = ListSink()
        daemon._io = (GroupMember(partitions), sink)
        daemon.apply_control([bad], sink)
        assert daemon.metrics.control_commands.labels("invalid")._value.get() == 1, "every member counts it"
        sent.append(len(sink.on(cfg.output.dead_letter_topic)))
    assert sent == [0, 1, 0], "only the member holding partition 0 of the first input topic sends it"


def test_muted_streams_counts_only_the_partitions_held_now() -> None:
    cfg = parse_config(RULES)
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()), control=IterSource([]))
    src, sink = IterSource(readings(0, 20), batch_size=10_000), ListSink()
    daemon.process(src.poll_batch(0), src, sink)  # m0, m1, m2 on partitions 0, 1, 2
    daemon.apply_control([control_record(0, b'{"action": "mute", "streams": "m*"}')], sink)
    member = GroupMember({("in", 0), ("in", 2)})  # partition 1 (m1) was handed over to another member
    daemon._io = (member, sink)
    daemon._follow_control(sink)
    assert daemon.metrics.muted_streams._value.get() == 2


def test_a_label_parses_and_a_false_alarm_raises_exactly_its_streams_levels_within_bounds() -> None:
    raw = b'{"action": "label", "streams": "m1", "alert_id": "a1", "as": "false_alarm", "note": "valve test"}'
    cmd = parse_command(raw, at=5.0)
    assert (cmd.action, cmd.streams, cmd.alert_id, cmd.label, cmd.note) == ("label", "m1", "a1", "false_alarm",
                                                                             "valve test")
    key, value = encode_command(cmd)
    assert key == b"label:a1" and parse_command(value, at=5.0) == cmd, "keyed by the alert: a relabel replaces it"
    for bad, reason in [(b'{"action": "label", "streams": "m1", "as": "false_alarm"}', "control_bad_label"),
                        (b'{"action": "label", "streams": "m1", "alert_id": "a", "as": "maybe"}', "control_bad_label"),
                        (b'{"action": "mute", "streams": "m1", "alert_id": "a"}', "control_bad_field")]:
        with pytest.raises(BadCommand) as err:
            parse_command(bad, at=0.0)
        assert err.value.reason == reason, bad

    def levels(labels: list[Command]) -> tuple[np.ndarray, list[tuple[str, str]]]:
        pipe = Pipeline(parse_config(RULES), random_artifact())
        for c in labels:
            pipe.command(c, SRC)
        out = pipe.process(readings(0, 160), NOW)
        names = [pipe.engine.streams[r] for r in out.windows.rows.tolist()]
        by_stream = {n: float(w) for n, w in zip(names, out.warning.tolist(), strict=True)}
        return np.array([by_stream[f"m{s}"] for s in range(3)]), anomalies(out)

    plain, raised = levels([])
    assert plain.tolist() == [5.0, 5.0, 5.0] and ("m1", "raised") in raised
    one, _ = levels([Command("label", "m1", alert_id="a1", label="false_alarm")])
    assert one.tolist() == [5.0, 6.25, 5.0], "x 1.25 for the labelled stream only"
    many = [Command("label", "m1", alert_id=f"a{i}", label="false_alarm") for i in range(6)]
    capped, _ = levels(many + [Command("label", "m2", alert_id="b", label="confirmed")])
    assert capped.tolist() == [5.0, 10.0, 5.0], "at most twice; a confirmed fault changes nothing"
    relabelled, _ = levels([Command("label", "m1", alert_id="a1", label="false_alarm"),
                            Command("label", "m1", alert_id="a1", label="confirmed")])
    assert relabelled.tolist() == [5.0, 5.0, 5.0], "a later label of the same alert replaces the earlier"
    pipe = Pipeline(parse_config(RULES), random_artifact())
    pipe.command(Command("label", "m1", alert_id="a1", label="false_alarm"), SRC)
    pipe.forget("label", "a1")  # its key deleted from the topic
    assert not pipe.feedback.any_false


def test_a_bad_commands_dead_letter_lost_with_an_aborted_transaction_is_sent_again() -> None:
    cfg = parse_config({**RULES, "delivery": {"guarantee": "exactly_once"}})
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()), control=IterSource([]))
    src, sink = IterSource(readings(0, 20), batch_size=10_000), ListSink()
    daemon.apply_control([control_record(7, b'{"action": "mute", "streams": "m2"')], sink)
    assert [r.topic for r in sink.pending] == [cfg.output.dead_letter_topic], "in the open transaction"
    daemon.rewind(src, sink, "test")  # the transaction aborts: its dead letter is gone, the command read
    assert sink.pending == [] and sink.on(cfg.output.dead_letter_topic) == []
    daemon._follow_control(sink)  # the next turn sends it again
    daemon.commit(src, sink)
    dead = sink.on(cfg.output.dead_letter_topic)
    assert [dict(r.headers)["source"] for r in dead] == [b"ctl[0]@7"]
    assert daemon.metrics.rejects.labels("control_bad_json")._value.get() == 1, "counted once"
    daemon.rewind(src, sink, "test")  # committed: a later rewind has nothing to send again
    daemon._follow_control(sink)
    daemon.commit(src, sink)
    assert len(sink.on(cfg.output.dead_letter_topic)) == 1


def test_control_promote_and_rollback_refuse_what_they_cannot_do(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from detector.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka: {bootstrap_servers: '127.0.0.1:1'}\n")  # never reached: each case fails before
    for args, said in ((["promote", "m1"], "promote takes no streams: it is for every stream"),
                       (["mute"], "mute needs the streams"),
                       (["rollback", "--version", "v2"], "--version is for promote only, not rollback"),
                       (["promote"], f"{cfg}: model.shadow is not set: there is no shadow model to promote")):
        assert main(["control", *args, "--config", str(cfg)]) == 2, args
        assert said in capsys.readouterr().err, args
