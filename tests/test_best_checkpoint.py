"""checkpoints/best.pt: the state at the step of the lowest validation loss metrics.csv records,
written when it improves, whole after a kill between it and last.pt, and what `--checkpoint best`
samples. The smoke preset on the made-up corpus has 10 steps per epoch."""

import csv

import pytest
import torch

import dlm.runs.train as train_module
from dlm.cli import main
from dlm.core.checkpoint import load_checkpoint
from dlm.runs.build import load_run
from dlm.runs.rundir import RunDir
from dlm.runs.train import train
from tests.conftest import toy_run_dir

WEIGHTS = ("model", "ema")


def lowest_validation(run: RunDir) -> tuple[int, float]:
    """(step, val_total) of metrics.csv's lowest validation loss: the oracle best.pt must match."""
    with open(run.metrics, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["val_total"]]
    row = min(rows, key=lambda row: float(row["val_total"]))
    return int(row["step"]), float(row["val_total"])


def same_weights(a: dict, b: dict) -> bool:
    return all(a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
               for key in WEIGHTS)


def scripted_validation(monkeypatch, values):
    """Validation losses that go down, up and down again: the lowest is not the last."""
    values = iter(values)

    def validation(model, objective, windows, config, device, ranks=None):
        value = next(values)
        return {f"val_{term}": value for term in objective.terms}

    monkeypatch.setattr(train_module, "validation_losses", validation)


@pytest.fixture
def config(smoke_config):
    return smoke_config.replace(precision="fp32", threads=1, epochs=5, checkpoint_every=1)


def test_best_pt_holds_the_state_of_the_lowest_recorded_validation_loss(config, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [5.0, 3.0, 4.0, 2.5, 2.75])
    run = RunDir(train(config, tmp_path / "run").run_dir)
    step, value = lowest_validation(run)
    assert (step, value) == (40, 2.5)
    best = load_checkpoint(run.best_checkpoint)
    assert (best["step"], best["epoch"], best["val_total"]) == (40, 4, 2.5)
    assert same_weights(best, load_checkpoint(run.epoch_checkpoint(4)))  # the state of that step, EMA too
    assert load_checkpoint(run.last_checkpoint)["best"] == {"step": 40, "val_total": 2.5}


def test_best_pt_of_a_real_run_is_its_lowest_validation_loss(config, tmp_path):
    run = RunDir(train(config.replace(lr=0.03), tmp_path / "run").run_dir)
    step, value = lowest_validation(run)
    best = load_checkpoint(run.best_checkpoint)
    assert best["step"] == step and best["val_total"] == pytest.approx(value, rel=1e-5)
    assert same_weights(best, load_checkpoint(run.epoch_checkpoint(best["epoch"])))


def test_a_kill_between_last_pt_and_best_pt_is_mended_on_resume(config, tmp_path, monkeypatch):
    """last.pt of step 20 records it as the best, then the process dies before best.pt is written:
    the resume gives best.pt last.pt's state, and remembers the record (no later epoch beats it)."""
    values = [5.0, 3.0, 4.0, 3.5, 4.0]
    scripted_validation(monkeypatch, values)
    whole = RunDir(train(config, tmp_path / "whole").run_dir)
    real_save = train_module.save_checkpoint

    def killed_before_the_second_best(path, payload):
        if path.name == "best.pt" and payload["step"] == 20:
            raise KeyboardInterrupt
        return real_save(path, payload)

    scripted_validation(monkeypatch, values[:2])
    monkeypatch.setattr(train_module, "save_checkpoint", killed_before_the_second_best)
    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(config, run.path)
    assert load_checkpoint(run.best_checkpoint)["step"] == 10  # one improvement behind last.pt's record
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    scripted_validation(monkeypatch, values[2:])  # epochs 3 to 5: worse than epoch 2, better than epoch 3
    train(config, run.path, resume=True)
    best = load_checkpoint(run.best_checkpoint)
    assert (best["step"], best["val_total"]) == (20, 3.0) == lowest_validation(run)
    assert same_weights(best, load_checkpoint(whole.best_checkpoint))
    assert same_weights(best, load_checkpoint(whole.epoch_checkpoint(2)))


def test_sample_chooses_the_best_checkpoint(config, tmp_path, monkeypatch, capsys):
    scripted_validation(monkeypatch, [5.0, 3.0, 4.0, 4.5, 4.0])
    run = RunDir(train(config, tmp_path / "run").run_dir)
    assert load_run(run.path, "best").step == 20 and load_run(run.path, "last").step == 50
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--run_dir", str(run.path), "--checkpoint", "best", "--num_samples", "2",
                 "--steps", "3", "--out", str(out)]) == 0
    assert f"from {run.best_checkpoint} (step 20)" in capsys.readouterr().out


def test_a_run_without_best_pt_says_which_to_choose(tmp_path, capsys):
    run = toy_run_dir(tmp_path / "old")  # a run written before best.pt
    assert main(["sample", "--run_dir", str(run), "--checkpoint", "best", "--out", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "keeps no checkpoints/best.pt" in err and "--checkpoint last" in err and err.count("\n") == 1
    assert not (tmp_path / "s.jsonl").exists()
