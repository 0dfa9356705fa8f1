"""The sampling temperature chosen by held-out text's unigram entropy (dlm calibrate, or
calibrate_temperature at the end of training): written for one checkpoint, the run's default
from then on, the recipe's own temperature still one flag away."""

import json

import pytest

from dlm.cli import main
from dlm.core.textstats import sample_stats
from dlm.evaluation.rundata import heldout_sequences
from dlm.runs.build import load_run
from tests.conftest import ROOT, make_corpus

MASKED_SMOKE = str(ROOT / "params" / "masked_smoke.yaml")
QUICK = ["--precision", "fp32", "--device", "cpu", "--min_count", "1", "--max_train_tokens", "none", "--threads", "1"]


def words(path):
    return [json.loads(line)["text"].split() for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A masked smoke run trained 30 steps, calibrated at the end of training."""
    root = tmp_path_factory.mktemp("calibrated")
    corpus = make_corpus(root / "corpus.txt")
    assert main(["train", MASKED_SMOKE, "--run_dir", str(root / "run"), "--corpus", str(corpus), "--max_steps", "30",
                 "--calibrate_temperature", *QUICK]) == 0
    return root / "run"


def test_training_ends_with_a_calibration_that_samples_at_heldout_entropy(calibrated, tmp_path):
    record = json.loads((calibrated / "calibration.json").read_text())
    assert record["checkpoint"] == "last.pt" and record["step"] == 30 and record["recipe_temperature"] == 1.0
    assert record["matched"] and record["temperature"] > 0
    # the recipe's temperature (1) is away from held-out entropy, on the side its temperature says
    hotter = record["temperature"] < 1.0
    assert (record["recipe_entropy_bits"] > record["heldout_entropy_bits"] * 1.01) == hotter
    # dlm sample with no --temperature: the calibrated one, and its samples at held-out entropy by a
    # count made here (64 samples of the calibration's seed, words as held-out windows are counted)
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(calibrated), "--num_samples", "64", "--batch_size", "64",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["temperature"] for row in rows} == {record["temperature"]}
    run = load_run(calibrated)
    samples = sample_stats([run.tokenizer.itos[i] for i in row["ids"]] for row in rows)["unigram_entropy"]
    heldout = sample_stats(heldout_sequences(run, 64))["unigram_entropy"]
    assert heldout == pytest.approx(record["heldout_entropy_bits"])
    assert samples == pytest.approx(heldout, rel=0.011)
    # the recipe's own temperature is one flag away
    hot = tmp_path / "hot.jsonl"
    assert main(["sample", "--run_dir", str(calibrated), "--num_samples", "64", "--batch_size", "64",
                 "--temperature", "1", "--out", str(hot)]) == 0
    hot_rows = [json.loads(line) for line in hot.read_text().splitlines()]
    at_recipe = sample_stats([run.tokenizer.itos[i] for i in row["ids"]] for row in hot_rows)["unigram_entropy"]
    assert at_recipe == pytest.approx(record["recipe_entropy_bits"])
    assert (at_recipe > samples) == hotter


def test_a_calibration_belongs_to_its_checkpoint(calibrated):
    recipe = load_run(calibrated, use_ema=False)  # other weights than the calibrated (EMA) ones
    assert recipe.calibration is None and recipe.config.decode_temperature == 1.0
    kept = sorted((calibrated / "checkpoints").glob("epoch_*.pt"))[0]
    assert load_run(calibrated, kept).config.decode_temperature == 1.0
    assert load_run(calibrated).config.decode_temperature == json.loads(
        (calibrated / "calibration.json").read_text())["temperature"]


def test_dlm_calibrate_rewrites_the_record_with_its_command(calibrated, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    (run / "calibration.json").unlink()
    assert main(["calibrate", "--run_dir", str(run), "--num_samples", "32", "--seed", "1"]) == 0
    record = json.loads((run / "calibration.json").read_text())
    assert record["num_samples"] == 32 and record["seed"] == 1 and record["command"].startswith("dlm calibrate")
    assert "held-out text:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--num_samples", "1"], "--num_samples must be at least 2"),
    (["--tolerance", "0"], "--tolerance is a relative distance to held-out entropy in (0, 0.5)"),
])
def test_bad_calibrate_options_are_one_line(calibrated, capsys, argv, message):
    before = (calibrated / "calibration.json").read_bytes()
    assert main(["calibrate", "--run_dir", str(calibrated), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert (calibrated / "calibration.json").read_bytes() == before
