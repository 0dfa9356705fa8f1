"""The warmup-stable-decay lr schedule (lr_decay: wsd), and dlm cooldown: a kept checkpoint of a
wsd run's stable phase, cooled down into a new run folder, is the run a fresh wsd run of that
total would have been. The smoke preset on the made-up corpus has 10 steps per epoch."""

import csv
import json
import logging

import pytest
import torch
import yaml

import dlm.runs.state as state_module
from dlm.cli import main
from dlm.core.checkpoint import load_checkpoint
from dlm.core.config import ConfigError
from dlm.runs.cooldown import cooldown
from dlm.runs.rundir import RunDir
from dlm.runs.state import lr_factor
from dlm.runs.train import train

TIMING = ("tokens_per_s", "elapsed_s")  # the only columns that differ between identical runs
RESUME_KEYS = {"optimizer", "scheduler", "ema_n_averaged", "rng", "timestep_sampler", "interval"}


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


# ---------------------------------------------------------------------------------------------
# dlm cooldown


def rows_after(run_dir, step):
    """metrics.csv's rows after `step`, less the timing columns."""
    return [{k: v for k, v in row.items() if k not in TIMING}
            for row in read_rows(RunDir(run_dir).metrics) if int(row["step"]) > step]


def same_tensors(a, b):
    """Two nested payloads of tensors and numbers, bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def long_run(exact, tmp_path):
    """40 steps, the last 10 a cooldown, a checkpoint kept at every epoch end (10 steps)."""
    config = exact.replace(epochs=100, max_steps=40, lr_cooldown_steps=10, checkpoint_every=1)
    return RunDir(train(config, tmp_path / "long").run_dir), config


def test_kept_checkpoints_of_the_stable_phase_hold_what_a_resume_needs(long_run):
    run, _ = long_run
    kept = {path.name: set(load_checkpoint(path)) for path in run.kept_checkpoints()}
    # steps 10, 20, 30: the next step trains at the full lr; step 40 ends the cooldown
    assert [name for name, keys in kept.items() if keys >= RESUME_KEYS] == [
        "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    assert not kept["epoch_0004.pt"] & RESUME_KEYS


@pytest.mark.parametrize("sampling", [{}, {"timestep_sampling": "loss_second_moment"}],
                         ids=["uniform", "loss_second_moment"])
def test_a_cooldown_is_the_fresh_wsd_run_of_its_total(exact, tmp_path, sampling):
    """From step 20 of a 40-step run, 7 steps of cooldown: bit for bit the run of 27 steps whose
    last 7 are its cooldown, from the same seed."""
    long = exact.replace(epochs=100, max_steps=40, lr_cooldown_steps=10, checkpoint_every=1, **sampling)
    train(long, tmp_path / "long")
    source = RunDir(tmp_path / "long").epoch_checkpoint(2)
    result = cooldown(source, tmp_path / "cooled", 7)
    fresh = train(long.replace(max_steps=27, lr_cooldown_steps=7), tmp_path / "fresh")
    assert result.step == fresh.step == 27
    cooled, expected = (load_checkpoint(RunDir(d).last_checkpoint) for d in (tmp_path / "cooled", tmp_path / "fresh"))
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "timestep_sampler", "step", "epoch"):
        assert same_tensors(cooled[key], expected[key]), key
    assert rows_after(tmp_path / "cooled", 20) == rows_after(tmp_path / "fresh", 20)
    assert [float(row["lr"]) for row in rows_after(tmp_path / "cooled", 20) if row["lr"]][-1] == 0.0
    assert load_checkpoint(RunDir(tmp_path / "cooled").best_checkpoint)["step"] == 27  # its own steps' best
    # the new folder: the run's config with the schedule that ends 7 steps on, and where it came from
    config = yaml.safe_load(RunDir(tmp_path / "cooled").config.read_text())
    assert (config["max_steps"], config["lr_cooldown_steps"], config["lr_decay"]) == (27, 7, "wsd")
    (entry,) = json.loads(RunDir(tmp_path / "cooled").provenance.read_text())["invocations"]
    assert entry["mode"] == "cooldown" and entry["from_step"] == 20
    assert entry["start"] == {"checkpoint": str(source), "step": 20,
                              "changed": {"max_steps": [40, 27], "lr_cooldown_steps": [10, 7]}}


def test_an_interrupted_cooldown_resumes_with_its_own_config(exact, long_run, tmp_path, monkeypatch, caplog):
    run, config = long_run
    fresh = train(config.replace(max_steps=35, lr_cooldown_steps=15), tmp_path / "fresh")
    real = state_module.train_step

    def stepping(*args, **kwargs):  # Ctrl-C as the 4th step after the start (step 24) begins
        stepping.count += 1
        if stepping.count == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    stepping.count = 0
    monkeypatch.setattr(state_module, "train_step", stepping)
    caplog.set_level(logging.INFO, logger="dlm")
    with pytest.raises(KeyboardInterrupt):
        cooldown(run.epoch_checkpoint(2), tmp_path / "cooled", 15)
    assert "remove" in caplog.text and "run the same dlm cooldown again" in caplog.text
    monkeypatch.undo()

    # once it kept a checkpoint, the folder is a run like any other: resumed with its own config.yaml
    stepping.count = -10  # the 14th step after the start (step 34), after the checkpoint at step 30
    monkeypatch.setattr(state_module, "train_step", stepping)
    cooled = RunDir(tmp_path / "cooled2")
    with pytest.raises(KeyboardInterrupt):
        cooldown(run.epoch_checkpoint(2), cooled.path, 15)
    assert f"continue with 'dlm train {cooled.config} --run_dir {cooled.path} --resume'" in caplog.text
    monkeypatch.undo()
    assert main(["train", str(cooled.config), "--run_dir", str(cooled.path), "--resume"]) == 0
    assert same_tensors(load_checkpoint(cooled.last_checkpoint)["model"],
                        load_checkpoint(RunDir(fresh.run_dir).last_checkpoint)["model"])
    assert rows_after(cooled.path, 20) == rows_after(fresh.run_dir, 20)


def cooldown_args(source, run_dir, *extra):
    return ["cooldown", "--from", str(source), "--run_dir", str(run_dir), *extra]


def test_the_cooldown_command_trains_and_says_where(long_run, tmp_path, capsys):
    run, _ = long_run
    assert main(cooldown_args(run.epoch_checkpoint(3), tmp_path / "cooled", "--cooldown_steps", "4",
                              "--log_every", "2", "--no-progress")) == 0
    assert "trained to step 34" in capsys.readouterr().out
    assert load_checkpoint(RunDir(tmp_path / "cooled").last_checkpoint)["config"]["log_every"] == 2


@pytest.mark.parametrize("case", ["occupied", "not wsd", "decayed", "missing", "no steps", "recipe", "torchrun"])
def test_a_cooldown_it_cannot_do_is_one_line_and_writes_nothing(long_run, exact, tmp_path, capsys, monkeypatch, case):
    run, _ = long_run
    source, steps, extra, destination = run.epoch_checkpoint(2), "5", [], tmp_path / "cooled"
    if case == "occupied":
        destination.mkdir()
        (destination / "notes.txt").write_text("mine")
    elif case == "not wsd":
        source = RunDir(train(exact.replace(lr_decay="linear"), tmp_path / "linear").run_dir).last_checkpoint
    elif case == "decayed":
        source = run.epoch_checkpoint(4)
    elif case == "missing":
        source = run.checkpoints / "epoch_0009.pt"
    elif case == "no steps":
        steps = "0"
    elif case == "torchrun":
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
    else:
        extra = ["--lr", "0.1"]
    assert main(cooldown_args(source, destination, "--cooldown_steps", steps, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dlm cooldown: error: ") and "Traceback" not in err
    expected = {"occupied": "is not empty", "not wsd": "lr_decay linear", "decayed": "warm-up or cooldown",
                "missing": "is not a checkpoint file", "no steps": "at least 1", "recipe": "cannot set lr",
                "torchrun": "runs in one process"}[case]
    assert expected in err
    assert [p.name for p in destination.iterdir()] == ["notes.txt"] if case == "occupied" else not destination.exists()


def test_a_cooldown_sets_only_what_a_run_records_and_how_it_executes():
    from dlm.runs.cooldown import COOLDOWN_OVERRIDES

    assert "threads" in COOLDOWN_OVERRIDES and "checkpoint_every" in COOLDOWN_OVERRIDES
    assert not {"lr", "max_steps", "epochs", "seed", "lr_cooldown_steps"} & set(COOLDOWN_OVERRIDES)
