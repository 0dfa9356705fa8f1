"""The warmup-stable-decay lr schedule (lr_decay: wsd), and dlm cooldown: a kept checkpoint of a
wsd run's stable phase, cooled down into a new run folder, is the run a fresh wsd run of that
total would have been. The smoke preset on the made-up corpus has 10 steps per epoch."""

import csv

import pytest

from dlm.core.config import ConfigError
from dlm.runs.train import lr_factor, train


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def exact(smoke_config):
    """fp32 and one thread: bitwise reproducible runs."""
    return smoke_config.replace(precision="fp32", threads=1, lr_decay="wsd", warmup_steps=2, log_every=3)


def test_wsd_warms_up_holds_the_lr_then_decays_it_linearly_to_zero(exact):
    # 10 steps, the last 4 a cooldown: the factors written out by hand
    config = exact.replace(lr_cooldown_steps=4)
    assert [lr_factor(step, config, 10) for step in range(11)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    # without lr_cooldown_steps: the last lr_cooldown_fraction of the run's steps
    config = exact.replace(lr_cooldown_fraction=0.2)
    assert [lr_factor(step, config, 10) for step in range(7, 11)] == [1, 1, 0.5, 0]
    # a cooldown longer than the run after warm-up: the warm-up's ramp wins where it is lower
    config = exact.replace(warmup_steps=4, lr_cooldown_steps=6)
    assert [lr_factor(step, config, 6) for step in range(6)] == [0.25, 0.5, 4 / 6, 3 / 6, 2 / 6, 1 / 6]


def test_a_wsd_run_logs_the_stable_lr_then_the_decayed_one(exact, tmp_path):
    config = exact.replace(epochs=100, max_steps=20, lr_cooldown_fraction=0.25, log_every=1)
    train(config, tmp_path / "run")
    # the lr column holds the lr of the step after the row's: 5 steps of cooldown end at 0
    lrs = [float(row["lr"]) for row in read_rows(tmp_path / "run" / "metrics.csv") if row["lr"]]
    expected = [config.lr * f for f in [1.0] * 15 + [0.8, 0.6, 0.4, 0.2, 0.0]]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("key, value", [("lr_cooldown_fraction", 0.0), ("lr_cooldown_fraction", 1.5),
                                        ("lr_cooldown_steps", 0)])
def test_a_cooldown_of_no_steps_is_refused(exact, key, value):
    with pytest.raises(ConfigError, match=key):
        exact.replace(**{key: value})
