"""Training that survives faults: kills at any moment (also mid-checkpoint), two writers, a
diverging loss, Ctrl-C, a run stopped before its first checkpoint; and provenance in every run.

The smoke preset on the made-up corpus has 10 steps per epoch; logging every 3 steps puts the
checkpoints (epoch ends) inside log intervals: a resumed run must restore the interval to log the
same rows."""

import csv
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dlm.runs.state as state_module
import dlm.runs.train as train_module
from dlm.cli import main
from dlm.core.checkpoint import load_checkpoint
from dlm.runs import provenance
from dlm.runs.rundir import RunDir, RunLock
from dlm.runs.train import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "params" / "smoke.yaml")
LOSS_COLUMNS = ("total", "mse", "rounding", "prior", "val_total", "val_mse", "val_rounding", "embedding_norm",
                "nn_distance", "lr")


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def losses(rows):
    """(step, epoch, the loss columns) of every metrics row: what must not depend on interruptions."""
    return [(r["step"], r["epoch"], *(r[c] for c in LOSS_COLUMNS)) for r in rows]


@pytest.fixture
def exact(smoke_config):
    """fp32 and one thread: bitwise reproducible losses."""
    threads = torch.get_num_threads()
    yield smoke_config.replace(precision="fp32", threads=1, epochs=100, max_steps=25, log_every=3)
    torch.set_num_threads(threads)


def cli_args(corpus, run, *extra):
    return ["train", SMOKE, "--run_dir", str(run), "--corpus", str(corpus), "--min_count", "1",
            "--precision", "fp32", "--threads", "1", "--epochs", "100", "--max_steps", "25", "--log_every", "3", *extra]


def interrupt_at(monkeypatch, step):
    """Ctrl-C as optimizer step `step` begins."""
    real = state_module.train_step

    def stepping(*args, **kwargs):
        stepping.count += 1
        if stepping.count == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    stepping.count = 0
    monkeypatch.setattr(state_module, "train_step", stepping)


# ---------------------------------------------------------------------------------------------
# Resume: the same rows as an uninterrupted run, no lost or duplicated ones


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(exact, tmp_path, monkeypatch, caplog):
    reference = train(exact, tmp_path / "reference")
    interrupt_at(monkeypatch, 24)  # after the checkpoint at step 20, which falls inside the interval 19..21
    caplog.set_level(logging.INFO, logger="dlm")
    with pytest.raises(KeyboardInterrupt):
        train(exact, tmp_path / "run")
    assert "interrupted at step 23" in caplog.text and "last.pt holds step 20" in caplog.text
    assert "--resume" in caplog.text
    monkeypatch.undo()
    resumed = train(exact, tmp_path / "run", resume=True)
    assert resumed.step == reference.step == 25
    rows, expected = read_rows(RunDir(tmp_path / "run").metrics), read_rows(RunDir(reference.run_dir).metrics)
    steps = [(r["step"], bool(r["val_total"])) for r in rows]
    assert len(steps) == len(set(steps))  # nothing logged twice
    # every row, the one straddling the checkpoint (steps 19..21) included, equals the uninterrupted run's
    assert losses(rows) == losses(expected)


def test_a_run_without_a_checkpoint_starts_afresh(exact, tmp_path, monkeypatch, caplog):
    run = RunDir(tmp_path / "run")
    interrupt_at(monkeypatch, 8)  # killed in epoch 1: metrics rows, no checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(exact, run.path)
    monkeypatch.undo()
    assert read_rows(run.metrics) and not run.has_checkpoint()
    caplog.set_level(logging.INFO, logger="dlm")
    for resume in (False, True):  # both ways out of the dead end
        result = train(exact.replace(max_steps=3), run.path, resume=resume)
        assert "starting it afresh" in caplog.text and result.step == 3
        rows = read_rows(run.metrics)
        assert [r["step"] for r in rows] == ["3", "3"]  # the killed run's rows are gone (train row, val row)
        run.last_checkpoint.unlink()
        for kept in run.kept_checkpoints():
            kept.unlink()
    train(exact.replace(epochs=0, max_steps=None), tmp_path / "zero")  # --epochs 0: no checkpoint either
    assert train(exact.replace(max_steps=3), tmp_path / "zero").step == 3


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("files", [
    {"notes.txt": b"my notes"},
    {"config.yaml": b"mine: 1\n", "vocab.json": b"{}", "metrics.csv": b"step,total\n1,2.0\n"},  # not dlm's run
    {"metrics.csv": b"step,total\n1,2.0\n"},
])
def test_a_fresh_run_never_overwrites_a_folder_that_is_not_a_run(tmp_path, corpus, capsys, files, resume):
    """Only a new or empty folder, or a run dlm started (provenance.json) that stopped before its first
    checkpoint, is (re)started; anything else is named and left byte-identical."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert main(cli_args(corpus, folder, *(["--resume"] if resume else []))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    if resume and "metrics.csv" not in files:
        assert "No run to resume" in err[0]
    else:
        assert f"holds {', '.join(sorted(files))} but no run of dlm's to continue" in err[0], err
        assert "a new run starts only in an empty or new folder" in err[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_resume_of_nothing_is_one_clear_line(tmp_path, corpus, capsys):
    assert main(cli_args(corpus, tmp_path / "absent", "--resume")) == 2
    err = capsys.readouterr().err
    assert "No run to resume" in err and "Drop --resume" in err and "Traceback" not in err
    assert not (tmp_path / "absent").exists()


def _drop_last_half_row(raw: bytes) -> tuple[bytes, int]:
    return raw[: raw.rstrip(b"\n").rfind(b"\n") + 1] + raw.rstrip(b"\n").rsplit(b"\n", 1)[1][:7], 1


def _drop_middle_rows(raw: bytes) -> tuple[bytes, int]:
    lines = raw.split(b"\n")
    return b"\n".join(lines[:3] + lines[6:]), 3


def _bad_byte_in_a_row(raw: bytes) -> tuple[bytes, int]:
    lines = raw.split(b"\n")
    lines[2] = lines[2][:4] + b"\xff" + lines[2][5:]
    return b"\n".join(lines), 1


def _step_not_a_number(raw: bytes) -> tuple[bytes, int]:
    lines = raw.split(b"\n")
    lines[3] = b"x" + lines[3].split(b",", 1)[1]
    return b"\n".join(lines), 1


def _damaged_header(raw: bytes) -> tuple[bytes, int]:
    return raw.replace(b"step,epoch,total", b"stXp,epoch,totaZ", 1), 0


@pytest.mark.parametrize("damage", [
    lambda raw: (b"", None), lambda raw: (raw[:len(raw) // 2], None), _drop_last_half_row, _drop_middle_rows,
    _bad_byte_in_a_row, _step_not_a_number, _damaged_header,
], ids=["emptied", "cut in half", "half a row", "rows missing", "non-utf8", "step not a number", "header"])
def test_a_damaged_metrics_csv_is_never_resumed_silently(tmp_path, corpus, capsys, caplog, damage):
    run = RunDir(tmp_path / "run")
    assert main(cli_args(corpus, run.path, "--max_steps", "20")) == 0  # checkpoint at step 20 (epoch 2)
    capsys.readouterr()
    whole = run.metrics.read_bytes()
    written = whole.count(b"\n") - 1
    damaged, lost = damage(whole)
    run.metrics.write_bytes(damaged)
    before = {path: path.read_bytes() for path in run.path.rglob("*") if path.is_file()}
    assert main(cli_args(corpus, run.path, "--resume")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "metrics.csv" in lines[0] and "--rebuild_metrics" in lines[0]
    assert {path: path.read_bytes() for path in run.path.rglob("*") if path.is_file()} == before  # nothing touched
    # the user's choice: rebuild from the rows that parse, told how many were lost
    caplog.set_level(logging.INFO, logger="dlm")
    assert main(cli_args(corpus, run.path, "--resume", "--rebuild_metrics")) == 0
    kept = re.search(r"from the (\d+) row\(s\) up to step 20 that parse; (\d+) of the (\d+)", caplog.text)
    assert kept and int(kept.group(3)) == written
    if lost is not None:
        assert int(kept.group(2)) == lost and int(kept.group(1)) == written - lost
    rows = read_rows(run.metrics)
    assert rows[-1]["step"] == "25" and all(row["step"].isdigit() for row in rows)


def test_an_intact_metrics_csv_resumes_without_a_word(tmp_path, corpus, caplog):
    run = RunDir(tmp_path / "run")
    assert main(cli_args(corpus, run.path, "--max_steps", "20")) == 0
    with open(run.metrics, "a") as handle:  # a row logged after the checkpoint, then a kill mid-write
        handle.write("21,3,0.5,0.1,0.2,0.3,,,,,,,,,,1,1,0.001,10,1\n22,3,0.4")
    caplog.set_level(logging.INFO, logger="dlm")
    assert main(cli_args(corpus, run.path, "--resume")) == 0
    assert "rebuilt" not in caplog.text
    steps = [int(row["step"]) for row in read_rows(run.metrics)]
    assert steps == sorted(steps) and steps.count(21) == 1 and steps[-1] == 25


def test_leftover_temp_files_are_removed_on_resume(exact, tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    train(exact.replace(max_steps=16), run.path)
    leftovers = [run.checkpoints / ".last.pt.k1l2.tmp", run.path / ".metrics.csv.x9.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    caplog.set_level(logging.INFO, logger="dlm")
    train(exact.replace(max_steps=20), run.path, resume=True)
    assert not any(path.exists() for path in leftovers)
    assert "removed 2 temp file(s) left by an interrupted write" in caplog.text
    assert ".last.pt.k1l2.tmp" in caplog.text


# ---------------------------------------------------------------------------------------------
# A full disk: one line saying what to free and how to go on; nothing cut short


def tree(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_full_disk_at_an_epoch_checkpoint_is_one_line_and_the_resume_writes_it(
        exact, tmp_path, corpus, capsys, caplog, small_disk):
    reference = RunDir(tmp_path / "reference")
    train(exact, reference.path)
    run = RunDir(tmp_path / "run")
    small_disk.full_for = "epoch_0002.pt"  # last.pt of step 20 fits, the epoch checkpoint beside it does not
    assert main(cli_args(corpus, run.path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bug in dlm" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("dlm train: error: The disk holding") and "'epoch_0002.pt' could not be written" in line
    assert "checkpoints/last.pt holds step 20; continue with 'dlm train PARAMS --run_dir" in line
    assert "The resume first writes the missing epoch_0002.pt from last.pt." in line
    assert not run.epoch_checkpoint(2).exists() and not run.leftover_temp_files()
    assert load_checkpoint(run.last_checkpoint)["step"] == 20
    small_disk.full_for = None  # space freed
    caplog.set_level(logging.INFO, logger="dlm")
    assert main(cli_args(corpus, run.path, "--resume")) == 0
    assert "checkpoints/epoch_0002.pt was missing (its write failed or was cut short): written from" in caplog.text
    for path in (run.epoch_checkpoint(2), run.last_checkpoint):  # as an uninterrupted run's
        kept, expected = load_checkpoint(path), load_checkpoint(reference.path / path.relative_to(run.path))
        assert kept["step"] == expected["step"]
        assert all(torch.equal(kept["model"][k], expected["model"][k]) for k in expected["model"])
    assert losses(read_rows(run.metrics)) == losses(read_rows(reference.metrics))


def test_a_full_disk_at_last_pt_keeps_the_previous_one(exact, tmp_path, corpus, capsys, small_disk):
    run = RunDir(tmp_path / "run")
    train(exact.replace(max_steps=10), run.path)  # last.pt of step 10
    before = tree(run.path)
    small_disk.full_for = "last.pt"
    assert main(cli_args(corpus, run.path, "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "'last.pt' could not be written (0." in line and "checkpoints/last.pt holds step 10; continue" in line
    assert run.last_checkpoint.read_bytes() == before[run.last_checkpoint] and not run.leftover_temp_files()


def test_a_full_disk_never_leaves_a_cut_metrics_row(tmp_path, small_disk):
    from dlm.core.errors import DiskFullError
    from dlm.runs.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path / "metrics.csv", terms=("total",))
    writer.write({"step": 1, "epoch": 1, "total": 0.5})
    before = (tmp_path / "metrics.csv").read_bytes()
    small_disk.full_for = "metrics.csv"
    with pytest.raises(DiskFullError, match="'metrics.csv' could not be written. Free space on that disk"):
        writer.write({"step": 2, "epoch": 1, "total": 0.25})
    assert (tmp_path / "metrics.csv").read_bytes() == before


@pytest.mark.parametrize("damage, message", [
    ("no sampler state", "holds no state of the timestep sampler its run trains with (time_warp: True, "
                         "timestep_sampling: uniform): it was written without one"),
    ("missing", "No checkpoint at 'RUN/checkpoints/last.pt'. dlm train resumes from last.pt alone (the kept "
                "epoch_*.pt hold no optimizer state): restore it from a copy, or train the run again"),
    ("cut short", "is corrupt or not a dlm checkpoint (RuntimeError). dlm train resumes from last.pt alone"),
])
def test_a_last_pt_that_cannot_resume_says_what_train_can_do(exact, tmp_path, corpus, capsys, damage, message):
    from dlm.core.checkpoint import save_checkpoint

    run = RunDir(tmp_path / "run")
    train(exact.replace(max_steps=10, time_warp=True), run.path)
    if damage == "no sampler state":  # as an older dlm, or a hand-edited file, wrote it
        payload = load_checkpoint(run.last_checkpoint)
        del payload["timestep_sampler"]
        save_checkpoint(run.last_checkpoint, payload)
    elif damage == "missing":
        run.last_checkpoint.unlink()
    else:
        run.last_checkpoint.write_bytes(run.last_checkpoint.read_bytes()[:1000])
    before = tree(run.path)
    assert main(cli_args(corpus, run.path, "--time_warp", "--resume")) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("dlm train: error: ")
    assert message.replace("RUN", str(run.path)) in line and "--checkpoint FILE" not in line.replace(
        "dlm sample --checkpoint FILE", "")  # dlm train has no --checkpoint
    assert tree(run.path) == before


# ---------------------------------------------------------------------------------------------
# One writer per run folder


def test_a_second_writer_stops_with_one_line(exact, tmp_path, corpus, capsys):
    run = RunDir(tmp_path / "run")
    train(exact.replace(max_steps=16), run.path)
    before = run.last_checkpoint.read_bytes()
    with RunLock(run):  # another process, as far as flock is concerned: a second open file description
        for extra in ((), ("--resume",)):
            assert main(cli_args(corpus, run.path, *extra)) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is being trained right now by pid" in err and "Traceback" not in err
    assert run.last_checkpoint.read_bytes() == before  # the refused writer wrote nothing
    assert main(cli_args(corpus, run.path, "--resume")) == 0  # released when the holder ends


@pytest.mark.parametrize("first_makes_the_folder", [True, False])
def test_two_trainers_starting_on_one_new_folder_the_loser_removes_nothing(tmp_path, corpus, capsys, monkeypatch,
                                                                           first_makes_the_folder):
    """The other trainer starts while this one is still choosing its device (a slow CUDA or torchrun
    start): it makes the folder (or this one does) and takes the lock first. This one then stops with
    one line and leaves the other's folder and lock alone."""
    from dlm.core.lockfile import FolderLock

    run = RunDir(tmp_path / "new" / "run")
    other = FolderLock(run.lock)
    real_pick, real_lock = train_module.pick_device, train_module.RunLock

    def slow_device_choice(name):
        if first_makes_the_folder:
            other.__enter__()  # makes the folder and its lock
        return real_pick(name)

    def lock_taken_first(folder):
        if not first_makes_the_folder:  # this process made the folder; the other locks it first
            other.__enter__()
        return real_lock(folder)

    monkeypatch.setattr(train_module, "pick_device", slow_device_choice)
    monkeypatch.setattr(train_module, "RunLock", lock_taken_first)
    try:
        assert main(cli_args(corpus, run.path)) == 2
        err = capsys.readouterr().err
        assert "is being trained right now by pid" in err and "Traceback" not in err
        assert run.lock.is_file() and [p.name for p in run.path.iterdir()] == [".train.lock"]
    finally:
        other.__exit__()


def test_a_failed_start_removes_the_folders_it_made_and_only_those(tmp_path, corpus, capsys):
    (tmp_path / "kept").mkdir()
    vectors = tmp_path / "kept" / "vectors.txt"
    vectors.write_text("speak 0.5 oops\n")
    run = tmp_path / "kept" / "made" / "also made" / "run"
    assert main(cli_args(corpus, run, "--init_from_pretrained", str(vectors))) == 2
    assert "is not 'word v1 v2 ...' text" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["vectors.txt"]


# ---------------------------------------------------------------------------------------------
# Divergence


def poison(monkeypatch, step, what):
    """At optimizer step `step`: a NaN mse term (backpropagated, so the weights go NaN too), an inf
    prior term, or NaN weights behind finite losses."""
    real = state_module.train_step

    def stepping(model, objective, optimizer, ids, config, *args, **kwargs):
        stepping.count += 1
        if stepping.count == step and what in ("nan", "inf"):
            real_losses = objective.training_losses

            def broken(*a, **k):
                result = real_losses(*a, **k)
                term = "mse" if what == "nan" else "prior"
                result[term] = result[term] + float(what)
                result["total"] = result["total"] + result[term]
                return result

            objective.training_losses = broken
            try:
                return real(model, objective, optimizer, ids, config, *args, **kwargs)
            finally:
                del objective.training_losses
        result = real(model, objective, optimizer, ids, config, *args, **kwargs)
        if stepping.count == step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return result

    stepping.count = 0
    monkeypatch.setattr(state_module, "train_step", stepping)


@pytest.mark.parametrize("step, what, said", [
    (14, "nan", "loss term 'mse' became nan"),        # caught at the log line of step 15
    (20, "inf", "loss term 'prior' became inf"),      # step 20 ends epoch 2 between log lines: caught before its checkpoint
    (20, "weights", "the weights (")])                # finite losses, NaN weights: caught before the checkpoint
def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_says_how_to_resume(
        tmp_path, corpus, capsys, monkeypatch, step, what, said):
    run = RunDir(tmp_path / "run")
    poison(monkeypatch, step, what)
    assert main(cli_args(corpus, run.path)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dlm train")]
    assert len(err) == 1
    assert f"Training diverged at step {step}: {said}" in err[0]
    kept = 10  # the first epoch's checkpoint; the second one's is refused
    assert f"last.pt is kept from step {kept}" in err[0]
    assert f"dlm train PARAMS --run_dir {run.path} --resume --lr 3e-05" in err[0]
    payload = load_checkpoint(run.last_checkpoint)
    assert payload["step"] == kept
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())
    assert not run.epoch_checkpoint(2).exists()
    monkeypatch.undo()
    if what != "nan":
        return
    # the way on the message names: resume with a lower lr, which resume now accepts
    assert main(cli_args(corpus, run.path, "--resume", "--lr", "3e-05")) == 0
    payload = load_checkpoint(run.last_checkpoint)
    assert payload["step"] == 25 and payload["config"]["lr"] == 3e-05
    assert {g["initial_lr"] for g in payload["optimizer"]["param_groups"]} == {3e-05}


def test_a_divergence_before_any_checkpoint_says_start_again(tmp_path, corpus, capsys, monkeypatch):
    poison(monkeypatch, 3, "nan")
    assert main(cli_args(corpus, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "Training diverged at step 3" in err and "No checkpoint was written yet" in err
    assert not RunDir(tmp_path / "run").last_checkpoint.exists()


# ---------------------------------------------------------------------------------------------
# Provenance


def test_provenance_lists_every_invocation(exact, tmp_path):
    run = RunDir(tmp_path / "run")
    train(exact.replace(max_steps=16), run.path)
    train(exact.replace(max_steps=20), run.path, resume=True)
    entries = json.loads(run.provenance.read_text())["invocations"]
    assert [(e["mode"], e["from_step"]) for e in entries] == [("fresh", 0), ("resume", 16)]
    assert entries[1]["argv"] == entries[0]["argv"]  # sys.argv: pytest's here
    for entry in entries:
        assert entry["device"] == "cpu" and entry["precision"] == "fp32" and entry["processes"] == 1
        assert entry["seed"] == exact.seed and entry["config"]["seq_len"] == exact.seq_len
        assert entry["versions"]["torch"] == torch.__version__ and "numpy" in entry["versions"]
        assert entry["git_dirty"] in (True, False, None) and "started" in entry
    assert entries[1]["config"]["max_steps"] == 20


def test_the_machine_a_time_was_measured_on(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon(R) 8480\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 "
                       "amx_bf16 amx_tile\n\nprocessor\t: 1\nmodel name\t: Some Xeon(R) 8480\n")
    assert provenance.machine(cpuinfo) == {"cpu": "Some Xeon(R) 8480", "cores": os.cpu_count(),
                                           "flags": ["amx_bf16", "avx512_bf16", "avx512f", "avx2"]}
    other = tmp_path / "cpuinfo_epyc"  # machine() is cached per file
    other.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n")
    assert provenance.machine(other)["flags"] == ["avx2"]
    assert provenance.machine(tmp_path / "absent")["flags"] == []
    assert "machine" in provenance.environment()


def test_git_state_is_null_without_git(monkeypatch, tmp_path):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert provenance.git_state() == {"git_commit": None, "git_dirty": None}
    monkeypatch.undo()
    assert provenance.git_state(tmp_path) == {"git_commit": None, "git_dirty": None}  # not a checkout
    if (ROOT / ".git").exists():
        state = provenance.git_state(ROOT)
        assert len(state["git_commit"]) == 40 and isinstance(state["git_dirty"], bool)


def test_report_json_carries_provenance(exact, tmp_path, monkeypatch):
    from dlm.workbench import workbook

    def fake_execute(notebook, output, parameters, **kwargs):  # the train notebook calls train()
        if Path(notebook).stem == "train":
            train(exact.replace(max_steps=3), parameters["run_dir"])

    monkeypatch.setattr(workbook, "execute", fake_execute)
    monkeypatch.setattr(workbook, "export_html", lambda executed, **kwargs: Path(executed).with_suffix(".html"))
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 1\n")
    report_dir = workbook.build_report(preset, reports_dir=tmp_path / "r")
    info = json.loads((report_dir / "report.json").read_text())["provenance"]
    assert {"git_commit", "git_dirty", "versions", "started"} <= set(info)
    assert [e["mode"] for e in info["run"]] == ["fresh"] and info["run"][0]["precision"] == "fp32"


# ---------------------------------------------------------------------------------------------
# Real processes: SIGKILL at random steps and mid-checkpoint, two processes, Ctrl-C

# `dlm train` whose first last.pt write after `skip` ones stops halfway: half the bytes in the hidden temp
# file, then it sleeps (holding the run's lock) until it is killed.
HANG_IN_WRITE = """
import sys, tempfile, time
from pathlib import Path
import dlm.core.checkpoint as checkpoint
real, skip = checkpoint.atomic_write_bytes, int(sys.argv[1])
def hanging(path, payload):
    if Path(path).name == "last.pt":
        hanging.count += 1
        if hanging.count > skip:
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".last.pt.", suffix=".tmp")
            with open(fd, "wb") as handle:
                handle.write(payload[: len(payload) // 2])
            time.sleep(600)
    real(path, payload)
hanging.count = 0
checkpoint.atomic_write_bytes = hanging
from dlm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start(args, log, hang_after=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = ([sys.executable, "-c", HANG_IN_WRITE, str(hang_after)] if hang_after is not None
               else [sys.executable, "-m", "dlm"]) + args
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the training process ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def logged_step(log):
    """The last step this process logged (metrics.csv may still hold a killed predecessor's rows)."""
    steps = re.findall(r"^step +(\d+)/", Path(log).read_text(), flags=re.MULTILINE)
    return int(steps[-1]) if steps else 0


def temp_files(run):
    return sorted(run.checkpoints.glob(".last.pt.*.tmp")) if run.checkpoints.exists() else []


@pytest.mark.slow
def test_sigkill_at_random_steps_and_mid_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path, corpus):
    rng = random.Random(os.getpid())
    # logging every 7 steps, no checkpoint (every 10) falls on a log step: each resume restores an interval
    args = cli_args(corpus, tmp_path / "run", "--max_steps", "64", "--log_every", "7")
    reference = cli_args(corpus, tmp_path / "reference", "--max_steps", "64", "--log_every", "7")
    run = RunDir(tmp_path / "run")
    assert start(reference, tmp_path / "reference.log").wait() == 0

    def kill_after(step, resume, log, jitter=0.02):
        # the smoke model steps in about 10 ms on a free core: a longer jitter could let the run
        # finish its 64 steps before the kill, and the next resume would have nothing to train
        process = start(args + (["--resume"] if resume else []), tmp_path / log)
        wait_for(lambda: logged_step(tmp_path / log) >= step, process)
        time.sleep(rng.uniform(0, jitter))  # somewhere in the next steps
        assert process.poll() is None, "the run finished before it could be killed"
        process.kill()
        process.wait()

    kill_after(1, False, "1.log", jitter=0)  # in epoch 1 (10 steps): no checkpoint yet
    assert not run.has_checkpoint()
    kill_after(rng.randint(15, 40), True, "2.log")
    assert "starting it afresh" in (tmp_path / "2.log").read_text()
    saved = load_checkpoint(run.last_checkpoint)["step"]

    # killed halfway through writing last.pt: the temp file stays, last.pt is the previous one, whole
    hung = start(args + ["--resume"], tmp_path / "3.log", hang_after=0)
    try:
        wait_for(lambda: bool(temp_files(run)), hung)
        time.sleep(0.2)
    finally:
        hung.kill()
        hung.wait()
    assert temp_files(run) and load_checkpoint(run.last_checkpoint)["step"] == saved

    kill_after(rng.randint(saved + 5, 60), True, "4.log")
    log = (tmp_path / "4.log").read_text()
    assert "removed 1 temp file(s) left by an interrupted write: checkpoints/.last.pt." in log
    assert not temp_files(run)
    assert start(args + ["--resume"], tmp_path / "5.log").wait() == 0

    rows, expected = read_rows(run.metrics), read_rows(tmp_path / "reference" / "metrics.csv")
    keys = [(r["step"], bool(r["val_total"])) for r in rows]
    assert len(keys) == len(set(keys)) and int(rows[-1]["step"]) == 64
    assert losses(rows) == losses(expected)  # nothing lost, nothing twice, the same losses


@pytest.mark.slow
def test_two_processes_on_one_run_folder(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    args = cli_args(corpus, run.path)
    first = start(args, tmp_path / "first.log", hang_after=0)  # holds the lock, stuck in its first checkpoint
    try:
        wait_for(lambda: bool(temp_files(run)), first)
        seconds = [start(args + extra, tmp_path / f"second{i}.log") for i, extra in enumerate(([], ["--resume"]))]
        assert [p.wait() for p in seconds] == [2, 2]
        for i in range(2):
            err = (tmp_path / f"second{i}.log").read_text()
            assert f"is being trained right now by pid {first.pid}" in err and "Traceback" not in err
        assert not run.last_checkpoint.exists()  # neither wrote a checkpoint
    finally:
        first.kill()  # its flock dies with it
        first.wait()
    assert start(args + ["--resume"], tmp_path / "after.log").wait() == 0


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stands_without_a_traceback(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    process = start(cli_args(corpus, run.path, "--max_steps", "100000"), tmp_path / "train.log")
    wait_for(lambda: logged_step(tmp_path / "train.log") >= 12, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    err = (tmp_path / "train.log").read_text()
    saved = load_checkpoint(run.last_checkpoint)["step"]  # an epoch end: none is written at the interruption
    assert saved % 10 == 0 and saved >= 10
    assert "interrupted at step" in err and f"last.pt holds step {saved};" in err and "--resume" in err
    assert err.rstrip().splitlines()[-1] == "dlm train: interrupted" and "Traceback" not in err
