"""Distributed training (DistributedDataParallel over torchrun's processes, gloo on the CPU): a
batch split over processes makes the update the whole batch makes in one process, and a run
checkpointed with 2 processes loads, samples and resumes in 1."""

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dlm.cli import without_nproc
from dlm.core.config import ConfigError
from dlm.core.noise import WindowKeys
from dlm.core.runtime import Ranks, current_ranks
from dlm.families.gaussian_model import DiffusionLM
from dlm.runs.build import build_objective, load_run
from dlm.runs.rundir import RunDir
from dlm.runs.sample import SampleOptions, generate
from dlm.runs.state import build_state
from dlm.runs.train import Interval, _train, steps_per_epoch, train

from .conftest import ROOT

# Exact arithmetic settings, so that 1 and 2 processes can be compared to float tolerance.
EXACT = {"precision": "fp32", "threads": 1, "dropout": 0.0}


def test_shards_cover_the_batch_evenly():
    assert [Ranks(r, 2).shard(16) for r in range(2)] == [(0, 8), (8, 16)]
    assert [Ranks(r, 3).shard(7) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert Ranks().shard(5) == (0, 5) and Ranks().is_main and not Ranks().distributed
    # A short last batch stays unless it would leave a process without a window.
    assert steps_per_epoch(33, 16) == 3 and steps_per_epoch(33, 16, 2) == 2 and steps_per_epoch(34, 16, 2) == 3
    assert steps_per_epoch(32, 16, 2) == 2


@pytest.mark.parametrize("options", [{"self_condition": 0.5, "time_warp": True}, {"left_to_right": 0.5},
                                     {"rounding_target": "clean", "predict": "epsilon"},
                                     {"timestep_sampling": "loss_second_moment"},
                                     {"timestep_sampling": "loss_second_moment", "block_size": 4, "block_training": "all"}])
def test_a_split_batch_draws_and_learns_what_the_whole_batch_does(smoke_config, options):
    """Each window's timestep and noise come from (seed, step, its index in the batch): two halves
    give the whole batch's gradient (their mean), which is what DDP averages."""
    config = smoke_config.replace(**EXACT, **options)
    torch.manual_seed(0)
    model = DiffusionLM(config, 40)
    ids = torch.randint(0, 40, (8, config.seq_len))

    def gradient(first: int, stop: int) -> torch.Tensor:
        model.zero_grad()
        keys = WindowKeys.batch(config.seed, 3, stop - first, first)
        objective = build_objective(config)
        if objective.importance is not None:  # measured and far from uniform: each window its own weight
            bins = objective.importance.bins
            objective.importance.load_state_dict({"square": torch.linspace(1, 100, bins, dtype=torch.float64),
                                                  "count": torch.full((bins,), 10.0, dtype=torch.float64)})
        objective.training_losses(model, ids[first:stop], keys=keys)["total"].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = gradient(0, 8)
    halves = (gradient(0, 4) + gradient(4, 8)) / 2
    assert torch.allclose(whole, halves, atol=1e-6), (whole - halves).abs().max()


def test_batch_size_is_the_global_batch_and_must_divide(smoke_config, tmp_path):
    with pytest.raises(ConfigError, match="must divide by the 3 processes"):
        _train(smoke_config, RunDir(tmp_path / "run"), None, torch.device("cpu"), Ranks(0, 3))


def test_nproc_checks_the_batch_before_launching(capsys):
    from dlm.cli import main

    assert main(["train", str(ROOT / "params" / "smoke.yaml"), "--run_dir", "unused", "--nproc", "3"]) == 2
    assert "must divide by the 3 processes" in capsys.readouterr().err


def test_nproc_is_left_out_of_the_workers_command_line():
    assert without_nproc(["train", "p.yaml", "--nproc", "2", "--run_dir", "r"]) == ["train", "p.yaml", "--run_dir", "r"]
    assert without_nproc(["train", "p.yaml", "--nproc=2", "--lr", "0.1"]) == ["train", "p.yaml", "--lr", "0.1"]


def one_step(config, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weights after one optimizer step on `ids`, on this process's shard when in a group."""
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    state = build_state(config, DiffusionLM(config, 40), total_steps=10)
    state.ranks = current_ranks()
    state.distribute(torch.device("cpu"))
    start, stop = state.ranks.shard(len(ids))
    state.train_on(ids[start:stop], start, len(ids))
    return {name: value.clone() for name, value in state.model.state_dict().items()}


def one_step_worker(rank: int, world: int, init_file: str, config, batches: list[torch.Tensor], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        updated = [one_step(config, ids) for ids in batches]
        if rank == 0:
            torch.save(updated, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_two_process_step_makes_the_one_process_update(smoke_config, tmp_path):
    """torch.multiprocessing + gloo: one step of 2 processes, each on its half of the global batch,
    against one process on the whole batch, with self-conditioning and the time warp on. A batch of
    16 windows (8 each) and one of 11 (shards of 6 and 5, weighed by their share)."""
    config = smoke_config.replace(**EXACT, self_condition=0.5, time_warp=True, ema_decay=0.9)
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 40, (windows, config.seq_len), generator=generator) for windows in (16, 11)]
    out = tmp_path / "two.pt"
    mp.spawn(one_step_worker, args=(2, str(tmp_path / "init"), config, batches, str(out)), nprocs=2, join=True)
    for ids, updated in zip(batches, torch.load(out)):
        difference = max_difference(one_step(config, ids), updated)
        print(f"one step, batch {len(ids)}, 2 processes vs 1: max abs weight difference {difference:.3g}")
        assert difference < 1e-6


def interval_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        interval = Interval(("total",), torch.device("cpu"))
        interval.add({"total": torch.tensor(rank + 1.0)}, torch.zeros(4, 3), share=0.5)  # this process's half
        saved = interval.state_dict()  # every process calls it at the same checkpoint
        if rank == 0:
            torch.save(saved, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_last_pt_keeps_the_open_log_interval_of_all_processes(tmp_path):
    """A distributed run's last.pt holds the open interval's sums over every process (here
    0.5 x 1 + 0.5 x 2), so a run resumed with any number of processes logs the same rows."""
    out = tmp_path / "interval.pt"
    mp.spawn(interval_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    saved = torch.load(out)
    assert saved["steps"] == 1 and saved["sums"].tolist() == [1.5]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(RunDir(run_dir).last_checkpoint, weights_only=False)["model"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_in_one(smoke_config, corpus, tmp_path):
    """`dlm train --nproc 2` (torchrun, gloo) against train() in this process on the same global
    batches: the same weights after an epoch; then both resume in one process to the same weights."""
    config = smoke_config.replace(**EXACT, epochs=1)
    one, two = tmp_path / "one", tmp_path / "two"
    train(config, one)
    overrides = [f"--{key}={value}" for key, value in {**EXACT, "corpus": corpus, "min_count": 1, "epochs": 1}.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "dlm", "train", str(ROOT / "params" / "smoke.yaml"),
                           "--max_train_tokens=100000000", "--run_dir", str(two), "--nproc", "2", *overrides],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed: 2 processes (gloo)" in done.stderr
    assert done.stdout.count("trained ") == 1  # rank 0 speaks for the run

    two_weights = weights(two)
    assert not any(key.startswith("module.") for key in two_weights)
    difference = max_difference(weights(one), two_weights)
    print(f"2 processes vs 1 after an epoch: max abs weight difference {difference:.3g}")
    # float32 sums in another order; AdamW amplifies that on near-zero gradients (the lr is 3e-4)
    assert difference < 1e-4
    logged = [list(csv.DictReader(RunDir(run).metrics.open())) for run in (one, two)]
    assert len(logged[0]) == len(logged[1])
    for a, b in zip(*logged):  # the losses (averaged over the processes) and validation losses
        for term in ("total", "mse", "rounding", "val_total", "val_mse", "val_rounding"):
            assert (a[term] == b[term] == "") or float(a[term]) == pytest.approx(float(b[term]), rel=1e-4)

    # The 2-process checkpoint loads and samples in one process ...
    run = load_run(two)
    batch = generate(run, SampleOptions.from_config(run.config, num_samples=2, steps=5))
    assert len(batch.texts) == 2
    # ... and both runs resume in one process (N=2 -> M=1) to the same weights.
    for folder in (one, two):
        train(config.replace(epochs=2), folder, resume=True)
    difference = max_difference(weights(one), weights(two))
    print(f"resumed in 1 process from 2 vs from 1: max abs weight difference {difference:.3g}")
    assert difference < 1e-4
