import json
import logging
import subprocess
import sys

import pytest
import torch

from dlm.cli import main
from dlm.core.checkpoint import load_checkpoint
from tests.conftest import ROOT

SMOKE = str(ROOT / "params" / "smoke.yaml")


def train_args(corpus, run_dir, *extra):
    return ["train", SMOKE, "--run_dir", str(run_dir), "--corpus", str(corpus), "--min_count", "1",
            "--max_train_tokens", "none", *extra]


@pytest.mark.slow
def test_smoke_train_and_sample_through_python_m(corpus, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "samples" / "s.jsonl"
    command = [sys.executable, "-m", "dlm"]
    subprocess.run([*command, *train_args(corpus, run_dir), "--epochs", "2", "--seed", "3"],
                   check=True, cwd=tmp_path, capture_output=True)
    assert (run_dir / "checkpoints" / "last.pt").exists()
    done = subprocess.run([*command, "sample", "--run_dir", str(run_dir), "--num_samples", "5", "--steps", "10",
                           "--out", str(out)], check=True, cwd=tmp_path, capture_output=True, text=True)
    assert "5 samples" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and all(r["text"].strip() for r in records)
    assert records[0]["steps"] == 10 and records[0]["decoder"] == "learned"
    lines = out.with_suffix(".txt").read_text().splitlines()
    assert lines == [r["text"].replace("\n", " / ") for r in records]


def test_sample_options_and_trajectory(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir)) == 0
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(run_dir), "--num_samples", "3", "--steps", "8", "--decoder", "cosine",
                 "--no-clamp", "--eta", "0", "--record_every", "2", "--spacing", "uniform", "--out", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["decoder"] == "cosine" and record["clamp"] is False and record["eta"] == 0.0
    assert record["spacing"] == "uniform"
    trajectory = json.loads(out.with_suffix(".trajectory.json").read_text())
    assert [f["index"] for f in trajectory["frames"]] == [0, 2, 4, 6, 7]
    assert len(trajectory["frames"][-1]["ids"]) == 3
    assert main(["stats", "--samples", str(out), "--run_dir", str(run_dir), "--json", str(tmp_path / "st.json")]) == 0
    stats = json.loads((tmp_path / "st.json").read_text())
    assert stats["heldout"]["tokens"] > 0 and 0 <= stats["samples"]["punctuation_share"] <= 1
    # text-only records (written by hand, or by another run) are encoded with the run's vocabulary
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": record["text"]}) + "\n")
    assert main(["stats", "--samples", str(texts), "--run_dir", str(run_dir), "--json", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["samples"]["tokens"] == len(record["ids"])
    # a --json under a file is refused before any work, in one line
    capsys.readouterr()
    assert main(["stats", "--samples", str(out), "--run_dir", str(run_dir), "--json", str(out / "st.json")]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--epoch", "3"], "Unknown config key 'epoch'"),
    (["--epochs", "three"], "'epochs' got 'three'; it must be an integer"),
    (["--schedule", "quadratic"], "one of: sqrt, linear, cosine"),
])
def test_bad_overrides_get_clear_errors(corpus, tmp_path, capsys, extra, message):
    assert main(train_args(corpus, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_corpus_and_empty_text(tmp_path, capsys):
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "r"), "--corpus", str(tmp_path / "no.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "r"), "--corpus", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_sampling_errors(corpus, tmp_path, capsys):
    assert main(["sample", "--run_dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir)) == 0
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["sample", "--run_dir", str(run_dir), "--checkpoint", str(bad), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "corrupt or not a dlm checkpoint" in capsys.readouterr().err
    assert main(["sample", "--run_dir", str(run_dir), "--steps", "100000", "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "steps must be between 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["sample", "--run_dir", str(run_dir), "--spacing", "cosine", "--out", str(tmp_path / "s.jsonl")])
    assert "invalid choice: 'cosine'" in capsys.readouterr().err


def test_resume_through_the_cli_extends_a_run(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--epochs", "1")) == 0
    assert main(train_args(corpus, run_dir, "--epochs", "1")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(train_args(corpus, run_dir, "--epochs", "2", "--resume")) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]


def test_pretrained_vectors_initialise_the_table(corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlm")
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("3 4\nspeak 1 0 0 2\nRomeo 0 1 0 1\nzzz 1 1 1 1\n")
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--epochs", "1", "--init_from_pretrained", str(vectors))) == 0
    assert "2 of" in caplog.text  # speak and Romeo are in the vocabulary, zzz is not
    # a dlm checkpoint works as a source of vectors too
    assert main(train_args(corpus, tmp_path / "run2", "--epochs", "1", "--init_from_pretrained",
                           str(run_dir / "checkpoints" / "last.pt"))) == 0


def test_frozen_embeddings_stay_fixed(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--epochs", "2", "--no-use_learned_embeddings")) == 0
    first = load_checkpoint(run_dir / "checkpoints" / "epoch_0001.pt")["model"]
    last = load_checkpoint(run_dir / "checkpoints" / "epoch_0002.pt")["model"]
    assert torch.equal(first["embedding.weight"], last["embedding.weight"])
    assert not torch.equal(first["denoiser.out_proj.weight"], last["denoiser.out_proj.weight"])


def test_ar_baseline_trains_samples_and_scores_diffusion_samples(corpus, tmp_path, capsys):
    teacher, student = tmp_path / "ar", tmp_path / "diffusion"
    assert main(["train-ar", *train_args(corpus, teacher, "--epochs", "3", "--lr", "0.003")[1:]]) == 0
    ar_samples, samples = tmp_path / "ar.jsonl", tmp_path / "d.jsonl"
    assert main(["sample", "--run_dir", str(teacher), "--num_samples", "4", "--temperature", "1.0",
                 "--out", str(ar_samples)]) == 0
    records = [json.loads(line) for line in ar_samples.read_text().splitlines()]
    assert len(records) == 4 and all(len(r["ids"]) == 16 for r in records) and records[0]["model"] == "ar"
    assert main(train_args(corpus, student, "--epochs", "1")) == 0
    assert main(["sample", "--run_dir", str(student), "--num_samples", "4", "--out", str(samples)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--samples", str(samples), "--teacher", str(teacher), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher_perplexity" in printed and "held-out" in printed and "collapsed:" in printed
    result = json.loads(out.read_text())
    assert result["samples"]["teacher_perplexity"] > 1 and result["heldout"]["teacher_perplexity"] > 1
    # the teacher's own samples at T=1 score exp(its entropy), below its held-out perplexity
    # (a tiny model over-fits: held-out text surprises it more than what it writes itself)
    assert main(["evaluate", "--samples", str(ar_samples), "--teacher", str(teacher), "--json", str(out)]) == 0
    own = json.loads(out.read_text())
    assert own["samples"]["teacher_perplexity"] < own["heldout"]["teacher_perplexity"]
    assert main(["evaluate", "--samples", str(samples), "--teacher", str(student)]) == 2
    assert "must be an autoregressive run" in capsys.readouterr().err


RENAMED = "model: diffusion is now called gaussian; loading it as gaussian"


@pytest.fixture
def fresh_rename_notice(monkeypatch):
    """The rename notice is said once per process: each test starts as a fresh process would."""
    from dlm.core import config

    monkeypatch.setattr(config, "_told_renamed", set())


def test_a_preset_that_says_model_diffusion_trains_as_gaussian_with_one_line(corpus, tmp_path, capsys,
                                                                              fresh_rename_notice):
    preset = tmp_path / "old.yaml"
    preset.write_text((ROOT / "params" / "smoke.yaml").read_text() + "model: diffusion\n")
    run_dir = tmp_path / "run"
    assert main(["train", str(preset), "--run_dir", str(run_dir), "--corpus", str(corpus), "--min_count", "1",
                 "--max_train_tokens", "none", "--max_steps", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("is now called") == 1 and RENAMED in err.splitlines()
    assert "model: gaussian" in (run_dir / "config.yaml").read_text()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]["model"] == "gaussian"


def test_a_checkpoint_of_model_diffusion_loads_as_gaussian_with_one_line(tmp_path, capsys, fresh_rename_notice):
    """A run trained before the rename (its checkpoint's config and its config.yaml say diffusion)
    samples as a Gaussian run; the rename is one line, however often the config is read."""
    import yaml

    from dlm.core.checkpoint import save_checkpoint
    from dlm.runs.rundir import RunDir
    from tests.conftest import toy_run_dir

    run = RunDir(toy_run_dir(tmp_path / "old"))
    payload = load_checkpoint(run.last_checkpoint)
    payload["config"]["model"] = "diffusion"
    save_checkpoint(run.last_checkpoint, payload)
    run.config.write_text(yaml.safe_dump(payload["config"]))
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(run.path), "--num_samples", "2", "--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("is now called") == 1 and RENAMED in err.splitlines()
    assert all(json.loads(line)["model"] == "gaussian" for line in out.read_text().splitlines())
    assert main(["evaluate", "--nll", "--run_dir", str(run.path), "--windows", "2", "--draws", "1"]) == 0
    assert "is now called" not in capsys.readouterr().err  # once per process
