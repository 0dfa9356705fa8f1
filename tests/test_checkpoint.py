import csv

import pytest
import torch

import dlm.runs.train as train_module
from dlm.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dlm.core.config import ConfigError
from dlm.runs.build import load_run
from dlm.runs.rundir import RunDir
from dlm.runs.train import RunExistsError, train


def test_round_trip(tmp_path):
    payload = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "config": {"lr": 0.1}, "maybe": None}
    path = save_checkpoint(tmp_path / "c.pt", payload)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"]) and loaded["step"] == 7
    assert loaded["maybe"] is None


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1})
    before = path.read_bytes()

    def broken(payload, buffer):
        buffer.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_corrupt_foreign_and_missing_files_get_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt or not a dlm checkpoint"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a dlm checkpoint"):
        load_checkpoint(foreign)
    truncated = tmp_path / "truncated.pt"
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.ones(1000)})
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_code_in_a_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "dlm-checkpoint", "version": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_changed_word_in_the_stored_vocabulary_fails_the_checksum(tmp_path):
    # The vocabulary and config are pickled strings beside the tensors: a same-length edit of one of
    # them ('Less' -> 'Mess', as a flipped bit did) must not load.
    payload = {"model": {"w": torch.ones(3)}, "vocab": {"tokens": ["<unk>", "Less", "more"]}, "config": {"lr": 0.1}}
    path = save_checkpoint(tmp_path / "c.pt", payload)
    raw = path.read_bytes()
    assert raw.count(b"Less") == 1
    path.write_bytes(raw.replace(b"Less", b"Mess"))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    path.write_bytes(raw.replace(b"0.1", b"0.7"))  # the config's lr, as a pickled float repr or not at all
    if path.read_bytes() != raw:
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def test_no_single_flipped_bit_loads_as_a_different_payload(tmp_path):
    # Every flip either is refused or loads exactly what was saved (a flip in zip metadata nobody reads).
    payload = {"model": {"w": torch.arange(8.0)}, "vocab": {"tokens": ["<unk>", "Less", "more", ","]},
               "config": {"lr": 0.001, "seq_len": 64, "clamp": False}, "step": 910, "epoch": 14}
    path = save_checkpoint(tmp_path / "c.pt", payload)
    raw = bytearray(path.read_bytes())
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, len(raw) * 8, (200,), generator=generator).tolist()
    refused = 0
    for position in positions:
        flipped = bytearray(raw)
        flipped[position // 8] ^= 1 << (position % 8)
        path.write_bytes(bytes(flipped))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError:
            refused += 1
            continue
        assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
        kept = {k: v for k, v in loaded.items() if k not in ("model", "format", "version")}
        assert kept == {k: v for k, v in payload.items() if k != "model"}
    assert refused > 0


def test_a_loaded_payload_saved_again_loads(tmp_path):
    import dlm.core.checkpoint as checkpoint

    old = tmp_path / "v1.pt"
    payload = {"model": {"w": torch.ones(2)}, "config": {"lr": 0.1}}
    torch.save({"format": checkpoint.FORMAT, "version": 1, **payload,
                "checksum": checkpoint.payload_checksum(payload, tensors_only=True)}, old)
    again = save_checkpoint(tmp_path / "again.pt", {**load_checkpoint(old), "config": {"lr": 0.2}})
    loaded = load_checkpoint(again)
    assert loaded["version"] == checkpoint.VERSION and loaded["config"] == {"lr": 0.2}


def test_a_version_1_checkpoint_is_still_read_with_its_tensor_checksum(tmp_path):
    import dlm.core.checkpoint as checkpoint

    payload = {"model": {"w": torch.ones(4)}, "vocab": {"tokens": ["a", "b"]}}
    path = tmp_path / "v1.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, **payload,
                "checksum": checkpoint.payload_checksum(payload, tensors_only=True)}, path)
    assert load_checkpoint(path)["vocab"] == {"tokens": ["a", "b"]}
    payload["model"]["w"][0] = 2.0  # a changed tensor is still caught in version 1
    torch.save({"format": checkpoint.FORMAT, "version": 1, **payload,
                "checksum": checkpoint.payload_checksum({"model": {"w": torch.ones(4)}}, tensors_only=True)}, path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_training_writes_a_run_folder_and_checkpoints_on_schedule(smoke_config, tmp_path):
    config = smoke_config.replace(epochs=4, checkpoint_every=2)
    result = train(config, tmp_path / "run")
    run = RunDir(result.run_dir)
    assert run.config.exists() and run.vocab.exists()
    assert [p.name for p in run.kept_checkpoints()] == ["epoch_0002.pt", "epoch_0004.pt"]
    rows = read_rows(run.metrics)
    assert rows[-1]["val_total"] and float(rows[0]["tokens_per_s"]) > 0 and float(rows[0]["embedding_norm"]) > 0
    loaded = load_run(run.path)
    assert loaded.step == result.step and loaded.epoch == 4 and loaded.used_ema


def test_kept_checkpoints_hold_weights_only_and_last_pt_all_a_resume_needs(smoke_config, tmp_path):
    run = RunDir(train(smoke_config.replace(epochs=2), tmp_path / "run").run_dir)
    kept, last = run.epoch_checkpoint(2), run.last_checkpoint
    weights = {"model", "ema", "config", "vocab", "step", "epoch", "corpus_sha256"}
    assert set(load_checkpoint(kept)) - {"format", "version"} == weights
    assert set(load_checkpoint(last)) >= weights | {"optimizer", "scheduler", "ema_n_averaged", "rng"}
    # AdamW's two moments are as large as the model and its EMA copy together
    assert kept.stat().st_size < 0.6 * last.stat().st_size
    for path in (kept, last):  # both still load as a run, EMA or not
        for use_ema in (True, False):
            loaded = load_run(run.path, checkpoint=path, use_ema=use_ema)
            assert loaded.epoch == 2 and loaded.used_ema == use_ema
    a, b = (load_run(run.path, checkpoint=p).model.state_dict() for p in (kept, last))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_losses(smoke_config, tmp_path):
    train(smoke_config, tmp_path / "a")
    train(smoke_config, tmp_path / "b")
    strip = ("tokens_per_s", "elapsed_s")
    a = [{k: v for k, v in r.items() if k not in strip} for r in read_rows(tmp_path / "a" / "metrics.csv")]
    b = [{k: v for k, v in r.items() if k not in strip} for r in read_rows(tmp_path / "b" / "metrics.csv")]
    assert a == b


@pytest.mark.parametrize("sampling", [{}, {"time_warp": True}, {"timestep_sampling": "loss_second_moment"}],
                         ids=["uniform", "time_warp", "loss_second_moment"])
def test_resume_continues_exactly_like_an_uninterrupted_run(smoke_config, tmp_path, monkeypatch, sampling):
    config = smoke_config.replace(epochs=3, **sampling)
    whole = train(config, tmp_path / "whole")

    real_save = train_module.save_checkpoint
    saves, crashed = [], {}

    def crash_after_first_epoch(path, payload):
        real_save(path, payload)
        saves.append(path.name)
        if path.name == "last.pt":
            crashed.update(payload)
            raise KeyboardInterrupt  # the process dies right after epoch 1 was saved

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "part")
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = train(config, tmp_path / "part", resume=True)

    assert resumed.step == whole.step
    strip = ("tokens_per_s", "elapsed_s")
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in read_rows(d / "metrics.csv")]
            for d in (tmp_path / "whole", tmp_path / "part")]
    assert rows[0] == rows[1]
    a = load_run(tmp_path / "whole", use_ema=False).model.state_dict()
    b = load_run(tmp_path / "part", use_ema=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(d / "checkpoints" / "last.pt", weights_only=False)["timestep_sampler"]
              for d in (tmp_path / "whole", tmp_path / "part")]
    if not sampling:
        assert states == [None, None]
    else:  # the measured density travels with the checkpoint, and was in use
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    if "time_warp" in sampling:
        assert states[0]["seen"].all()
    if "timestep_sampling" in sampling:  # measured before the crash: the resumed epochs drew from it
        assert (crashed["timestep_sampler"]["count"] >= 10).all()


def test_an_existing_run_is_never_overwritten(smoke_config, tmp_path):
    train(smoke_config, tmp_path / "run")
    before = (tmp_path / "run" / "metrics.csv").read_bytes()
    with pytest.raises(RunExistsError, match="--resume"):
        train(smoke_config, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == before


def test_a_time_budget_stops_on_the_clock_and_decays_the_lr_over_it(smoke_config, tmp_path):
    config = smoke_config.replace(epochs=10**6, max_train_seconds=1.5, warmup_steps=1, lr_decay="linear",
                                  log_every=1, checkpoint_every=10**6)
    result = train(config, tmp_path / "run")
    assert 1.5 <= result.wall_s and result.epoch < 10**6  # it stopped on the clock, not on the epochs
    rows = [r for r in read_rows(tmp_path / "run" / "metrics.csv") if r["lr"]]
    assert len(rows) == result.step > 3
    lrs = [float(r["lr"]) for r in rows]
    # the schedule decays over the budget: from near the peak to near the 10% floor at the end
    assert lrs[1] > 0.6 * config.lr and lrs[-1] < 0.35 * config.lr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert load_run(tmp_path / "run").step == result.step
    with pytest.raises(ConfigError, match="max_train_seconds"):
        smoke_config.replace(max_train_seconds=0)
