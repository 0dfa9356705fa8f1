"""benchmarks/speed.py at tiny sizes: every row is there and every number is positive (nothing timed)."""

import csv
import importlib.util

import pytest

from tests.conftest import ROOT


def load_speed():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_benchmark_has_every_row(corpus, tmp_path, capsys):
    speed = load_speed()
    out = tmp_path / "speed.csv"
    assert speed.main(["--quick", "--in_process", "--threads", "1", "--corpus", str(corpus),
                       "--override", "min_count=1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(float(r["value"]) > 0 for r in rows)
    keys = {(r["section"], r["metric"]) for r in rows}
    for preset in ("default.yaml", "seed.yaml"):
        metrics = {r["metric"] for r in rows if r["section"] == "train" and r["setting"].startswith(preset)}
        assert metrics == {"dlm throughput", "dlm step time", "dlm MFU", "dlm peak memory", "reference throughput",
                           "reference MFU", "dlm / reference"}
    assert len([r for r in rows if r["metric"] == "best"]) == 2  # the fp32 and bf16 ceilings
    assert {("ceiling", "best"), ("sample", "per step"), ("sample", "throughput"), ("scaling", "step time")} <= keys
    assert len([r for r in rows if r["section"] == "sample"]) == 6  # three chain lengths, two metrics
    assert len([r for r in rows if r["section"] == "scaling"]) == 2 * (2 + 3)  # two seq_lens, three vocabularies
    # the option measured by default is the precision default.yaml did not resolve to here
    resolved = [r["setting"].rsplit(", ", 1)[1] for r in rows if r["section"] == "train" and r["setting"].startswith("default")]
    other = {"bf16": "fp32", "fp32": "bf16"}[resolved[0]]
    options = {r["metric"] for r in rows if r["section"] == "option" and r["setting"] == f"default.yaml, precision={other}"}
    assert options == {"dlm throughput", "speed-up", "dlm MFU", "dlm peak memory"}
    assert ("option", "per step") in keys  # sampling at that precision
    assert "| train | default.yaml" in table and "extrapolated" in table


def test_flops_count_matches_the_model():
    """6 x the weights of every matmul per token: check the analytic count against the model."""
    import torch

    from dlm.core.config import load_config
    from dlm.families.gaussian_model import DiffusionLM

    speed = load_speed()
    config = load_config(ROOT / "params" / "default.yaml")
    model = DiffusionLM(config, vocab_size=1000)
    matrices = sum(m.weight.numel() for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "time_mlp" not in name)
    flops = speed.flops_per_token(config, 1000)
    time_mlp = sum(m.weight.numel() for m in model.denoiser.time_mlp if isinstance(m, torch.nn.Linear))
    assert flops["denoiser"] == pytest.approx(6 * (matrices + time_mlp / config.seq_len))
    assert flops["rounding"] == 6 * config.embed_dim * 1000
    assert flops["attention"] == 12 * config.depth * config.seq_len * config.width


@pytest.mark.slow
def test_training_runs_in_its_own_process(corpus):
    speed = load_speed()
    result = speed.training_in_subprocess("smoke.yaml", {"corpus": str(corpus), "min_count": 1, "max_train_tokens": None},
                                          "dlm", warmup=1, steps=1, threads=1)
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0 and result["vocab"] > 10


def test_block_rows_time_each_block_size_with_and_without_the_cache(corpus, tmp_path):
    speed = load_speed()
    out = tmp_path / "blocks.csv"
    assert speed.main(["--blocks_only", "--quick", "--threads", "1", "--corpus", str(corpus),
                       "--override", "min_count=1", "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["section"] == "blocks" and float(r["value"]) > 0 for r in rows)
    settings = {r["setting"] for r in rows if r["metric"] == "throughput"}
    assert settings == {"whole window, 5 steps"} | {f"blocks of {size}, 2 steps a block, {how}"
                                                    for size in (1, 4) for how in ("cached", "uncached")}
