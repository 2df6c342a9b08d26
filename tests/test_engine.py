"""The batched engine: same scores as each stream alone, whatever the batching; late, gaps and growth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detector.engine as engine_mod
from detector.decode import Readings
from detector.engine import Engine
from detector.errors import ModelError
from tests.helpers import bfloat16_error, needs_bfloat16, random_artifact, readings, sine_values

T0 = 1_700_000_000.0


def alone(art, stream: str, ts: np.ndarray, values: np.ndarray) -> dict[float, float]:
    eng = Engine(art, capacity=1)
    res = eng.score_batch(readings(stream, ts, values))
    return dict(zip(res.windows.end_ts.tolist(), res.windows.score.tolist(), strict=True))


def test_batched_scores_equal_each_stream_alone_including_late_joiners() -> None:
    art = random_artifact(window=8, hop=4, hidden=16, layers=2)
    rng = np.random.default_rng(1)
    n_streams, n = 40, 120
    data = {}
    for s in range(n_streams):
        join = 0 if s < 25 else int(rng.integers(10, 80))  # 15 streams appear mid-way
        ts = T0 + 60.0 * np.arange(join, n)
        data[f"m-{s}"] = (ts, sine_values(n - join, seed=s, phase=s))
    # one big interleaved feed, in time order, cut into batches of irregular size
    rows = [(t, s, i) for s, (ts, _) in data.items() for i, t in enumerate(ts)]
    rows.sort()
    eng = Engine(art, capacity=4)  # forces the table to grow several times
    got: dict[tuple[str, float], float] = {}
    pos = 0
    while pos < len(rows):
        size = int(rng.integers(1, 300))
        chunk = rows[pos:pos + size]
        pos += size
        streams = [s for _, s, _ in chunk]
        ts = np.array([t for t, _, _ in chunk])
        vals = np.stack([data[s][1][i] for _, s, i in chunk])
        res = eng.score_batch(readings(streams, ts, vals))
        w = res.windows
        for r, e, sc in zip(w.rows, w.end_ts, w.score, strict=True):
            got[(eng.streams[r], e)] = sc
    assert eng.capacity >= n_streams
    expected = {(s, e): sc for s, (ts, v) in data.items() for e, sc in alone(art, s, ts, v).items()}
    assert set(got) == set(expected)
    assert len(expected) > 500
    diff = max(abs(got[k] - expected[k]) / max(1.0, abs(expected[k])) for k in expected)
    assert diff < 1e-4


def test_window_count_and_reading_positions() -> None:
    art = random_artifact(window=8, hop=4)
    ts = T0 + np.arange(30.0)
    res = Engine(art).score_batch(readings("a", ts, sine_values(30, 0)))
    w = res.windows
    # windows end at readings 8, 12, ..., 28 (1-based), each covering the last 8 readings
    assert w.end_ts.tolist() == (T0 + np.array([7, 11, 15, 19, 23, 27])).tolist()
    assert (w.end_ts - w.start_ts).tolist() == [7.0] * 6
    assert w.reading.tolist() == [7, 11, 15, 19, 23, 27]
    assert np.allclose(w.share.sum(axis=1), 1.0, atol=1e-5)
    assert set(np.unique(w.direction)) <= {-1, 0, 1}


def test_out_of_order_within_a_batch_is_reordered_late_and_duplicates_dropped() -> None:
    art = random_artifact()
    ts = T0 + np.arange(40.0)
    v = sine_values(40, 3)
    ref = alone(art, "a", ts, v)
    perm = np.random.default_rng(0).permutation(40)
    eng = Engine(art)
    res = eng.score_batch(readings("a", ts[perm], v[perm]))
    assert dict(zip(res.windows.end_ts.tolist(), res.windows.score.tolist(), strict=True)) == pytest.approx(ref)
    # a second batch: one late reading, one duplicate of the last, one good
    late = eng.score_batch(readings("a", np.array([T0 + 5, T0 + 39, T0 + 40]), sine_values(3, 9)))
    assert sorted(late.dropped_reason.tolist()) == ["duplicate_timestamp", "late"]
    assert sorted(late.dropped.tolist()) == [0, 1]
    assert eng.count[0] == 41


def test_missing_values_are_imputed_and_masked() -> None:
    art = random_artifact()
    ts = T0 + np.arange(40.0)
    v = sine_values(40, 4)
    holes = v.copy()
    holes[10:14, 1] = np.nan
    holes[20, :2] = np.nan
    res = Engine(art).score_batch(readings("a", ts, holes))
    assert np.isfinite(res.windows.score).all()
    assert len(res.windows) == len(alone(art, "a", ts, v))


def test_a_gap_resets_the_stream_like_a_new_one() -> None:
    art = random_artifact()
    eng = Engine(art, max_gap_s=300)
    v = sine_values(60, 5)
    eng.score_batch(readings("a", T0 + 60.0 * np.arange(30), v[:30]))
    after = T0 + 60.0 * 29 + 3600 + 60.0 * np.arange(30)  # an hour of silence
    res = eng.score_batch(readings("a", after, v[30:]))
    assert res.resets == 1
    fresh = alone(art, "b", after, v[30:])
    assert dict(zip(res.windows.end_ts.tolist(), res.windows.score.tolist(), strict=True)) == pytest.approx(fresh)


def test_a_gap_inside_one_batch_splits_it() -> None:
    art = random_artifact()
    v = sine_values(60, 6)
    ts = np.concatenate([T0 + 60.0 * np.arange(30), T0 + 100_000 + 60.0 * np.arange(30)])
    res = Engine(art, max_gap_s=300).score_batch(readings(["a"] * 60, ts, v))
    second = alone(art, "x", ts[30:], v[30:])
    got = dict(zip(res.windows.end_ts.tolist(), res.windows.score.tolist(), strict=True))
    assert {k: got[k] for k in second} == pytest.approx(second)
    assert len(got) == len(alone(art, "x", ts[:30], v[:30])) + len(second)


def test_empty_batch() -> None:
    res = Engine(random_artifact()).score_batch(Readings.empty(3))
    assert len(res.windows) == 0 and len(res.dropped) == 0


def test_adaptation_quiets_a_feature_that_runs_noisier_and_keeps_new_faults_visible() -> None:
    art = random_artifact(window=8, hop=4, hidden=16)
    rng = np.random.default_rng(7)
    n = 800
    v = sine_values(n, seed=3)
    v[:, 0] += rng.normal(0.0, 3 * 5.0, n)  # feature 0 (scale 5) runs far noisier than the model has seen
    v[700:, 1] += 10 * 0.2  # then feature 1 (scale 0.2) shifts: a new fault
    ts = T0 + 60.0 * np.arange(n)
    plain, adapted = Engine(art), Engine(art, adapt_halflife=20)
    out, levels = {}, {}
    for name, eng in (("plain", plain), ("adapted", adapted)):
        parts = []
        for a in range(0, n, 50):
            parts.append(eng.score_batch(readings("m", ts[a:a + 50], v[a:a + 50])).windows)
            if a + 50 == 700:
                levels[name] = eng.level[0].clone()  # just before the fault
        out[name] = (np.concatenate([p.end_ts for p in parts]), np.concatenate([p.score for p in parts]),
                     np.concatenate([p.share for p in parts]))
    end, s_plain, _ = out["plain"]
    _, s_adapt, share = out["adapted"]
    assert levels["adapted"][0] > 4 and levels["adapted"][1] < 3
    before = (end > T0 + 60 * 400) & (end < T0 + 60 * 700)
    assert np.median(s_adapt[before]) < 0.2 * np.median(s_plain[before]), "the noisy feature no longer dominates"
    during = end >= T0 + 60 * 716
    assert np.median(s_adapt[during]) > 5 * np.median(s_adapt[before]), "the new fault stands out"
    assert (share[during].argmax(axis=1) == 1).mean() > 0.8, "and is attributed to feature 1"
    in_use = plain.level[:len(plain.streams)]
    assert (levels["plain"] == 1.0).all() and (in_use == 1.0).all(), "without a half-life nothing is learned"


def test_use_threads_sets_torchs_cpu_threads_and_zero_keeps_its_default() -> None:
    import torch

    from detector.engine import use_threads
    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 == torch.get_num_threads()
        assert use_threads(0) == 1  # 0 leaves whatever is set
        assert use_threads(2) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@needs_bfloat16
def test_bfloat16_scores_close_to_float32_and_keeps_the_state_in_float32() -> None:
    art = random_artifact(window=8, hop=4, hidden=16)
    streams = [f"m{i % 20}" for i in range(20 * 40)]
    ts = T0 + 60.0 * np.repeat(np.arange(40), 20)
    vals = np.concatenate([sine_values(40, seed=s, phase=s) for s in range(20)]).reshape(20, 40, -1)
    vals = vals.transpose(1, 0, 2).reshape(800, -1)
    full, mixed = Engine(art), Engine(art, precision="bfloat16")
    a, b = full.score_batch(readings(streams, ts, vals)).windows, mixed.score_batch(readings(streams, ts, vals)).windows
    assert len(a) == len(b) == 20 * 9 and np.array_equal(a.end_ts, b.end_ts)
    rel = np.abs(a.score - b.score) / np.maximum(np.abs(a.score), 1e-6)
    assert 0 < np.median(rel) < 0.05, "bfloat16 computes differently (8-bit mantissa), yet scores nearly agree"
    assert mixed.h.dtype == mixed.c.dtype == mixed.buf.dtype == torch.float32


def test_an_engine_owns_its_model_and_leaves_the_artifacts_alone() -> None:
    art = random_artifact()
    art.model.train()
    eng = Engine(art)
    assert art.model.training and not eng.model.training
    with torch.no_grad():
        next(eng.model.parameters()).add_(1.0)
    assert not torch.equal(next(eng.model.parameters()), next(art.model.parameters()))


def test_float16_needs_a_cuda_device_and_says_so() -> None:
    with pytest.raises(ModelError, match=r"model.precision float16 needs a CUDA device.*use float32 \(or auto\)"):
        Engine(random_artifact(), device="cpu", precision="float16")


ONEDNN = ("could not create a primitive descriptor for the LSTM forward propagation primitive. Run workload with "
          "environment variable ONEDNN_VERBOSE=all to get additional diagnostic information.")


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The engine's test pass of the model, forced: set ["fails"] to make it raise as oneDNN does; counts calls."""
    seen: dict[str, object] = {"fails": False, "calls": []}

    def fake(model, device, precision) -> None:
        seen["calls"].append((str(device), precision, model.hidden_size))  # type: ignore[attr-defined]
        if seen["fails"]:
            raise RuntimeError(ONEDNN)

    monkeypatch.setattr(engine_mod, "probe_model", fake)
    monkeypatch.setattr(engine_mod, "_PROBED", {})
    return seen


def test_a_precision_the_device_cannot_run_is_refused_in_one_line(probe: dict) -> None:
    probe["fails"] = True
    with pytest.raises(ModelError) as err:
        Engine(random_artifact(), device="cpu", precision="bfloat16")
    assert str(err.value) == (
        "model.precision bfloat16 does not run on cpu here (a test pass of the model failed: could not create a "
        "primitive descriptor for the LSTM forward propagation primitive): use float32 there (or auto: bfloat16 "
        "where it runs, float32 elsewhere)")
    assert Engine(random_artifact(), device="cpu").precision == "float32"  # float32 is never probed
    assert probe["calls"] == [("cpu", "bfloat16", 16)]


def test_auto_takes_bfloat16_where_the_model_runs_in_it_and_float32_elsewhere(probe: dict) -> None:
    assert Engine(random_artifact(), precision="auto").precision == "bfloat16"
    assert Engine(random_artifact(), precision="bfloat16").precision == "bfloat16"
    probe["fails"] = True
    assert Engine(random_artifact(), precision="auto").precision == "bfloat16", "cached per device and shape"
    auto = Engine(random_artifact(hidden=12), precision="auto")  # another shape: probed again, and it fails
    assert auto.precision == "float32" and not auto._mixed()._enabled
    assert probe["calls"] == [("cpu", "bfloat16", 16), ("cpu", "bfloat16", 12)]


def test_the_probe_fails_exactly_where_scoring_in_bfloat16_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test pass takes the engine's own paths: where it fails, a bfloat16 engine let through crashes."""
    why = bfloat16_error()  # the real test pass, on this machine
    monkeypatch.setattr(engine_mod, "probe_model", lambda model, device, precision: None)  # let it through
    monkeypatch.setattr(engine_mod, "_PROBED", {})
    eng = Engine(random_artifact(window=8, hop=4, hidden=16), precision="bfloat16")
    ts = T0 + 60.0 * np.repeat(np.arange(12), 2)
    vals = np.stack([sine_values(12, seed=0), sine_values(12, seed=1)], axis=1).reshape(24, -1)
    batch = readings(["a", "b"] * 12, ts, vals)  # both streams the same length: the LSTM runs unpacked
    if why is None:
        assert len(eng.score_batch(batch).windows) == 2 * 2
    else:
        with pytest.raises(RuntimeError, match="primitive descriptor"):
            eng.score_batch(batch)


def test_chunked_model_calls_score_like_one_call_and_the_host_views_follow_the_table(monkeypatch) -> None:
    import detector.engine as engine_mod

    art = random_artifact(window=8, hop=4, hidden=16, layers=2)
    n_streams, n = 10, 24  # every stream completes windows in every batch of 12 readings
    ts = T0 + 60.0 * np.arange(n)
    streams = np.repeat([f"m{s}" for s in range(n_streams)], n)
    values = np.concatenate([sine_values(n, seed=s, phase=s) for s in range(n_streams)])
    times = np.tile(ts, n_streams)

    def run(chunk: int) -> tuple[Engine, list[np.ndarray]]:
        monkeypatch.setattr(engine_mod, "CHUNK", chunk)
        eng = Engine(art)
        scores = []
        for half in (times < ts[12], times >= ts[12]):
            w = eng.score_batch(readings(list(streams[half]), times[half], values[half])).windows
            scores.append(w.score)
        return eng, scores

    whole, one_call = run(1 << 20)
    chunked, in_chunks = run(3)  # 10 streams: calls of 3, 3, 3 and 1
    assert [len(s) for s in one_call] == [n_streams * 2, n_streams * 3]
    for a, b in zip(one_call, in_chunks, strict=True):
        assert np.allclose(a, b, rtol=1e-5)
    assert np.allclose(whole.h[:, :n_streams].numpy(), chunked.h[:, :n_streams].numpy(), atol=1e-6)
    assert chunked.readings_seen().tolist() == [n] * n_streams
    assert chunked.last_times().tolist() == [ts[-1]] * n_streams


def test_released_rows_go_to_new_streams_which_start_fresh_and_the_others_go_on() -> None:
    art = random_artifact(window=8, hop=4)
    ts = T0 + 60.0 * np.arange(40)
    v = {s: sine_values(40, seed=i) for i, s in enumerate("abcd")}
    eng = Engine(art, capacity=4)

    def feed(streams: str, lo: int, hi: int) -> dict[str, list[float]]:
        res = eng.score_batch(readings([s for s in streams for _ in range(lo, hi)],
                                       np.concatenate([ts[lo:hi]] * len(streams)),
                                       np.concatenate([v[s][lo:hi] for s in streams])))
        w = res.windows
        return {s: [float(x) for r, x in zip(w.rows, w.score, strict=True) if eng.streams[r] == s] for s in streams}

    feed("abc", 0, 20)
    rows = eng.rows_for(np.array(["a", "b", "c"], dtype=object))
    eng.release(rows[[0, 2]])
    assert eng.live_streams == 1 and eng.streams[rows[1]] == "b" and eng.live_rows().tolist() == [rows[1]]
    assert float(eng.count[rows[0]]) == 0 and float(eng.h[:, rows[0]].abs().max()) == 0, "a released row is fresh"
    got = feed("bda", 20, 40)  # d and a (back) take the released rows; b goes on where it was
    assert sorted(eng.rows_for(np.array(["d", "a"], dtype=object)).tolist()) == sorted(rows[[0, 2]].tolist())
    assert eng.capacity == 4 and eng.live_streams == 3
    for s in "da":  # a new stream in a reused row scores as one in a new engine
        assert np.allclose(got[s], list(alone(art, s, ts[20:], v[s][20:]).values()), rtol=1e-5)
    assert np.allclose(got["b"], list(alone(art, "b", ts, v["b"]).values())[-len(got["b"]):], rtol=1e-5)


def test_online_finetuning_learns_normal_windows_in_the_decoder_only_and_never_an_anomaly() -> None:
    art = random_artifact(window=8, hop=4, hidden=16)  # untrained: much to learn
    n = 1600
    v, ts = sine_values(n, seed=3), T0 + 60.0 * np.arange(n)
    plain, tuned = Engine(art), Engine(art, finetune_rate=1e-2)
    level = art.manifest.quantile(engine_mod.FINETUNE_QUANTILE)
    scores = {}
    for name, eng in (("plain", plain), ("tuned", tuned)):
        parts = [eng.score_batch(readings("m", ts[a:a + 50], v[a:a + 50])).windows for a in range(0, n, 50)]
        scores[name] = np.concatenate([p.score for p in parts])
    assert np.median(scores["plain"]) < level, "normal windows score under the tuning level"
    late = slice(-100, None)
    assert np.median(scores["tuned"][late]) < 0.5 * np.median(scores["plain"][late])
    for name, p in tuned.model.named_parameters():
        same = torch.equal(p, dict(plain.model.named_parameters())[name])
        assert same == name.startswith(("encoder", "next_head")), name  # the encoder's state stays valid
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), art.model.parameters(), strict=True)), \
        "the artifact's model is never tuned"

    far = Engine(art, finetune_rate=1e-2)  # every window past the level: nothing is learnt
    out = far.score_batch(readings("m", ts[:400], v[:400] + np.array([60.0, 10.0, 20.0], np.float32))).windows
    assert (out.score >= level).all()
    assert all(torch.equal(p, q) for p, q in zip(far.model.parameters(), art.model.parameters(), strict=True))


def test_rows_reserved_ahead_are_written_fresh_only_when_a_stream_takes_them() -> None:
    art = random_artifact(window=8, hop=4)
    ts = T0 + 60.0 * np.arange(40)
    v = {s: sine_values(40, seed=i) for i, s in enumerate("abc")}
    eng = Engine(art, capacity=2)
    first = eng.score_batch(readings(["a"] * 20, ts[:20], v["a"][:20]))
    eng.reserve(50)  # a restore expecting up to 50 more streams: one growth, not several
    assert eng.capacity == 51 and eng._filled == 1
    with torch.inference_mode():  # what the untouched memory may hold: anything
        for name, (_, dtype, _) in eng._all_tables().items():
            table = getattr(eng, name)
            at = (slice(None), slice(1, None)) if name in ("h", "c") else slice(1, None)
            table[at] = True if dtype == torch.bool else 7
    res = eng.score_batch(readings([s for s in "abc" for _ in range(20, 40)], np.concatenate([ts[20:]] * 3),
                                   np.concatenate([v[s][20:] for s in "abc"])))
    got = {s: [float(x) for r, x in zip(res.windows.rows, res.windows.score, strict=True) if eng.streams[r] == s]
           for s in "abc"}
    for s in "bc":  # new streams in reserved rows score as in a new engine
        assert np.allclose(got[s], list(alone(art, s, ts[20:], v[s][20:]).values()), rtol=1e-5)
    want = list(alone(art, "a", ts, v["a"]).values())
    assert np.allclose([*first.windows.score.tolist(), *got["a"]], want, rtol=1e-5), "a goes on where it was"
    assert eng.capacity == 51 and eng._filled == 3
    eng.reserve(10)  # room enough already: nothing changes
    assert eng.capacity == 51


def test_adaptation_starts_from_the_validation_level_where_errors_are_not_standardised() -> None:
    import dataclasses

    from detector.artifact import Artifact

    # errors in the input's units (train --error-scale input): a spread of 20 makes every squared error small,
    # so a level floored at 1 would never move; adapt_base says where 1 is
    art = random_artifact(window=8, hop=4, hidden=16)
    wide = dataclasses.replace(art.manifest, error_std=[20.0] * 3)
    n = 600
    v = sine_values(n, seed=3)
    ts = T0 + 60.0 * np.arange(n)
    probe = Engine(Artifact(art.model, wide, art.path))
    normal = probe.score_batch(readings("m", ts[:300], v[:300])).windows.feature_score
    base = normal.mean(axis=0)
    assert (base < 0.05).all(), base
    v[300:, 0] += np.random.default_rng(7).normal(0.0, 3 * 5.0, n - 300)  # then feature 0 runs far noisier
    levels = {}
    for name, m in (("floored at 1", wide), ("from adapt_base", dataclasses.replace(wide, adapt_base=base.tolist()))):
        eng = Engine(Artifact(art.model, m, art.path), adapt_halflife=20)
        for a in range(0, n, 50):
            eng.score_batch(readings("m", ts[a:a + 50], v[a:a + 50]))
        levels[name] = eng.level[0].tolist()
    assert levels["floored at 1"] == [1.0, 1.0, 1.0], "nothing reaches a level of 1 in the input's units"
    adapted = levels["from adapt_base"]
    assert adapted[0] > 10 and adapted[1] < 3 and adapted[2] < 3, adapted


def test_stream_rows_stay_right_through_many_additions_and_releases() -> None:
    eng, held = Engine(random_artifact()), {}  # held: the reference, stream id -> row
    rng = np.random.default_rng(0)
    for step in range(300):
        if step % 7 == 6 and held:  # a rewind or a forget sweep lets some streams go
            gone = rng.choice(sorted(held), size=max(len(held) // 3, 1), replace=False)
            eng.release(np.array([held.pop(s) for s in gone.tolist()]))
        batch = np.array([f"s{int(i)}" for i in rng.integers(0, 20_000, 1500)], dtype=object)
        rows = eng.rows_for(batch)
        for s, r in zip(batch.tolist(), rows.tolist(), strict=True):
            assert held.setdefault(s, r) == r, s  # a held stream keeps its row; a new one gets a row of its own
        assert len(set(held.values())) == len(held) == eng.live_streams
    names = sorted(held)
    assert eng.find([*names, "never-seen"]).tolist() == [held[s] for s in names] + [-1]


def test_a_table_all_of_whose_streams_go_starts_afresh_at_its_first_size() -> None:
    eng = Engine(random_artifact(), capacity=8)
    rows = eng.rows_for(np.array([f"s{i}" for i in range(1000)], dtype=object))
    assert eng.capacity >= 1000 and eng.rows_used == 1000
    eng.release(rows[:10])  # some go: their rows wait for new streams, the table keeps its size
    assert eng.capacity >= 1000 and eng.live_streams == 990
    eng.release(rows)  # the rest (a rewind): the big table is freed
    assert (eng.capacity, eng.rows_used, eng.live_streams, eng.buf.shape[0]) == (8, 0, 0, 8)
    assert eng.rows_for(np.array(["s5", "new"], dtype=object)).tolist() == [0, 1]
    assert eng.find(["s999"]).tolist() == [-1]
