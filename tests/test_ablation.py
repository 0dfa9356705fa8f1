"""The ablation machinery behind benchmarks/quality.py, on a made-up corpus and tiny models."""

import importlib.util

import pandas as pd
import pytest
import torch

from dlm.core.config import load_config
from dlm.evaluation.ablation import AR_ARMS, ARMS, Arm, arm_config, markdown_table, run_ablation
from dlm.runs.train import train
from tests.conftest import ROOT


def load_quality_script():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = {"seq_len": 16, "embed_dim": 16, "width": 32, "depth": 1, "heads": 2, "batch_size": 16, "warmup_steps": 2,
        "progress": False, "val_batches": 1, "min_count": 1}


@pytest.fixture
def tiny_default(corpus):
    """params/default.yaml, the base every arm changes, at tiny sizes."""
    return load_config(ROOT / "params" / "default.yaml", corpus=str(corpus), diffusion_steps=100, sample_steps=10,
                       **TINY)


@pytest.fixture
def tiny_ar(corpus):
    return load_config(ROOT / "params" / "ar.yaml", corpus=str(corpus), epochs=2, **TINY)


def test_arm_names_are_unique_and_every_override_is_a_config_key(tiny_default, tiny_ar):
    names = [arm.name for arm in ARMS + AR_ARMS]
    assert len(names) == len(set(names))
    for arm in ARMS + AR_ARMS:
        config = arm_config(tiny_default, arm, tiny_ar)  # raises on an unknown or ill-typed key
        for key, value in arm.train.items():
            if key != "model":
                assert getattr(config, key) == value


def test_ar_arms_train_on_the_base_data_and_batch(tiny_default, tiny_ar):
    config = arm_config(tiny_default.replace(batch_size=4, seq_len=12), AR_ARMS[0], tiny_ar)
    assert config.model == "ar" and config.batch_size == 4 and config.seq_len == 12
    assert config.corpus == tiny_default.corpus
    with pytest.raises(ValueError, match="AR preset"):
        arm_config(tiny_default, AR_ARMS[0], None)


@pytest.mark.slow
def test_run_ablation_shares_runs_between_decoding_arms_and_scores_every_arm(tmp_path, tiny_default, tiny_ar):
    teacher = tmp_path / "teacher"
    train(tiny_ar, teacher)
    arms = [Arm("base", "base"), Arm("decode cosine", "decoding", sample={"decoder": "cosine"}),
            Arm("rounding on clean", "rounding target", {"rounding_target": "clean"}), AR_ARMS[1]]
    table = run_ablation(tiny_default, arms, teacher, tmp_path / "work", budget_s=0.5, num_samples=4,
                         ar_preset=tiny_ar, log=lambda line: None)
    assert list(table["arm"]) == ["held-out text", "base", "decode cosine", "rounding on clean", "AR T=0.8"]
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == ["run00", "run01", "run02"]
    scored = table.iloc[1:]
    assert (scored["teacher_perplexity"] > 1).all() and scored["steps"].min() >= 1
    # every arm trained on the clock: its budget, plus at most the last step, validation and checkpoint
    assert ((scored["train_s"] >= 0.5) & (scored["train_s"] < 5)).all()
    assert table.loc[0, "teacher_perplexity"] > 1 and table.loc[0, "collapsed"] == False  # noqa: E712
    # the two decoding arms read the same run, so they trained the same steps
    assert scored.iloc[0]["steps"] == scored.iloc[1]["steps"]
    markdown = markdown_table(table)
    assert markdown.count("\n") == 2 + len(table)
    assert "| held-out text | reference |" in markdown and "| AR T=0.8 | autoregressive |" in markdown


@pytest.mark.slow
def test_quality_script_quick_writes_csv_and_markdown(tmp_path, corpus):
    quality = load_quality_script()
    rc = quality.main(["--quick", "--corpus", str(corpus), "--arms", "base,draw at T=1,MBR of 4", "--no_ar",
                       "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--budget_s", "0.5",
                       "--matched"])
    assert rc == 0
    table = pd.read_csv(tmp_path / "out" / "quality_quick.csv").set_index("arm")
    assert list(table.index) == ["held-out text", "base", "draw at T=1", "MBR of 4"]
    assert (tmp_path / "work" / "teacher" / "checkpoints" / "last.pt").exists()  # trained when not given
    markdown = (tmp_path / "out" / "quality_quick.md").read_text()
    assert "draw at T=1" in markdown and "ppl at held-out entropy" in markdown
    # at held-out entropy the final draw's temperature is the search's, not the arm's: the same chain
    # (same run, same seed) then scores the same, where at their own temperatures the two differ
    base, drawn = table.loc["base"], table.loc["draw at T=1"]
    assert base["teacher_perplexity"] != drawn["teacher_perplexity"]
    assert base["matched_perplexity"] == drawn["matched_perplexity"] > 1
    assert base["matched_temperature"] == drawn["matched_temperature"]
    assert pd.isna(table.loc["MBR of 4", "matched_perplexity"])  # an MBR pick is no temperature's draw


def test_quality_script_rejects_an_unknown_arm(tmp_path, corpus, capsys):
    quality = load_quality_script()
    assert quality.main(["--quick", "--corpus", str(corpus), "--arms", "bogus", "--work", str(tmp_path)]) == 2
    assert "Unknown arm(s): bogus" in capsys.readouterr().err


def test_mbr_picks_keep_the_medoid_of_each_group():
    from dlm.evaluation.ablation import mbr_picks

    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 9, 9],   # group 1: the first two agree
                        [7, 7, 7, 7], [5, 6, 7, 8], [5, 6, 7, 8]])  # group 2: the last two agree
    picked = mbr_picks(ids, 3)
    assert picked.tolist() in ([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 5], [5, 6, 7, 8]])
    assert torch.equal(mbr_picks(ids, 1), ids)
