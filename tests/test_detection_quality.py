"""Detection quality regression: a shorter demo at a fixed seed must keep what it catches.

The floors below come from the figures measured on 2026-12-07. With the defaults of that morning (no
cross-sensor relation score): 5 of 10 faults caught (stuck 2 of 2 as sensor faults; level shift, drift and
noise burst 1 of 2 each; spikes 0 of 2), no false alert. With the relation score on by default (chosen by the
rule in docs/evaluation.md on the full demo, SKAB valve1 and NAB: on the 50-pump demo it catches three more
faults a run with no more false alerts) this small fleet, with less than a day to learn from, gives 4 of 10
(stuck 2, drift 2) and one false alert: the floors were lowered to keep one fault and one false alert of
margin under that, and docs/evaluation.md reports it as the cost of the default. With errors in the input's
units and only the relations that hold on the validation rows scored (the defaults from the fourth session of
2026-12-07, chosen by the same rule) it catches 8 of 10 (stuck 2, drift 2, noise burst 2, level shift 1, spike
1) with one false alert, and the model's floor was raised to one fault under that. With the spike score on by
default (2026-12-08, by the same rule: the 50-pump demo catches 21.7 faults a run instead of 17.7, no false
alert in three runs) it catches 9 of 10 (both spikes now) with two false alerts: the second is the spike score's
on rpm, whose level this fleet sets from 20 hours of history, too short to have seen the largest peaks that
load reversals give rpm. The model's floor is one under the 7 it catches, a spike floor is added, and the
false-alert ceiling keeps one of margin over the 2. Later work may raise them,
and must not fall below them without saying why. The margin is there so that another CPU's last-bit
arithmetic cannot flip the test; deterministic otherwise (fixed seeds, one torch thread), and nothing here
depends on the machine's speed.
"""

from __future__ import annotations

from collections import Counter

import torch

from detector.demo import run_demo
from detector.train import TrainParams

# 20 pumps, 10 faults (two of each kind), 1,200 normal readings to learn from and 1,200 to watch
FLEET = {"streams": 20, "readings": 2400, "normal": 1200, "seed": 7}
PARAMS = TrainParams(name="quality", epochs=12, steps_per_epoch=40, seed=0)

STUCK_CAUGHT = 2  # the sensor gate's, not the model's: exact
MODEL_CAUGHT = 6  # drift, level shift, noise burst and spike together (measured: 7; 6 without the spike score)
SPIKES_CAUGHT = 1  # measured: 2 (1 without the spike score)
MAX_FALSE_ALERTS = 3  # measured: 2 (1 without the spike score: its own is on rpm)


def test_the_demo_keeps_catching_what_it_caught() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic on every machine
    try:
        res = run_demo(**FLEET, progress=False, params=PARAMS)
    finally:
        torch.set_num_threads(threads)
    kinds = Counter(f.kind for f, _, _ in res.caught)
    seen = (f"caught {len(res.caught)} of {len(res.caught) + len(res.missed)}, by kind {dict(kinds)}, "
            f"false alerts {len(res.false_alerts)}")
    assert len(res.caught) + len(res.missed) == 10, seen
    assert kinds["stuck"] >= STUCK_CAUGHT, seen
    assert len(res.caught) - kinds["stuck"] >= MODEL_CAUGHT, seen
    assert kinds["spike"] >= SPIKES_CAUGHT, seen
    assert len(res.false_alerts) <= MAX_FALSE_ALERTS, seen
