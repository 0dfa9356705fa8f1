import json
import math
import shutil

import pandas as pd
import pytest
import torch

from dlm.core.embeddings import nearest_neighbour_distances, pca_project
from dlm.core.textstats import distinct_n, sample_stats
from dlm.evaluation import analysis, rundata
from dlm.evaluation.collapse import collapse_signals, run_collapse_verdict, signal_table
from dlm.evaluation.rundata import pick_checkpoints
from dlm.runs.rundir import RunDir
from dlm.runs.train import embedding_stats, train

HELDOUT = {"punctuation_share": 0.2, "unigram_entropy": 8.0, "distinct_2": 0.9, "top1_share": 0.08}


def healthy(epoch, **changes):
    row = {"run": "r", "epoch": epoch, "punctuation_share": 0.22, "unigram_entropy": 7.5, "distinct_2": 0.85,
           "top1_share": 0.07, "top1_token": ",", "embedding_norm": 5.0, "nn_over_sigma0": 30.0}
    return {**row, **changes}


def series_of(rows):
    frame = pd.DataFrame(rows)
    flags = [collapse_signals(r, HELDOUT) for r in rows]
    frame["collapsed"] = [any(f.values()) for f in flags]
    frame["signals"] = [", ".join(k for k, v in f.items() if v) for f in flags]
    return frame


def test_distinct_n_and_sample_stats():
    seqs = [["a", "b", "a", "b", "\n"], ["a", ",", "<pad>"]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 6)  # a b a b | a , -> {a, b, ','}
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)  # ab ba ab | a, -> 3 distinct of 4
    stats = sample_stats(seqs)
    assert stats["tokens"] == 6 and stats["types"] == 3
    assert stats["punctuation_share"] == pytest.approx(1 / 6)
    assert stats["top1_token"] == "a" and stats["top1_share"] == pytest.approx(3 / 6)
    shares = (3 / 6, 2 / 6, 1 / 6)
    assert stats["unigram_entropy"] == pytest.approx(-sum(p * math.log2(p) for p in shares))
    assert sample_stats([])["tokens"] == 0


def test_nearest_neighbour_distances_match_brute_force():
    table = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    full = torch.cdist(table, table) + torch.diag(torch.full((37,), float("inf")))
    assert torch.allclose(nearest_neighbour_distances(table, chunk=8), full.min(-1).values, atol=1e-5)
    # the first `rows` rows against the whole table: what training logs on a large vocabulary
    assert torch.allclose(nearest_neighbour_distances(table, rows=10, chunk=4), full.min(-1).values[:10], atol=1e-5)
    stats = embedding_stats(table, max_rows=10)
    assert stats["nn_distance"] == pytest.approx(full.min(-1).values[:10].mean().item(), abs=1e-5)


def test_projection_is_the_shared_pca():
    table = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    projected = pca_project(table, 2)
    assert projected.shape == (20, 2)
    centred = table - table.mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).S[:2]
    assert torch.allclose(projected.norm(dim=0), top, atol=1e-4)  # the top two components' spread


def test_pick_checkpoints_keeps_first_and_last():
    paths = [f"e{i}" for i in range(10)]
    assert pick_checkpoints(paths, 0) == paths and pick_checkpoints(paths, 20) == paths
    picked = pick_checkpoints(paths, 4)
    assert picked[0] == "e0" and picked[-1] == "e9" and len(picked) == 4
    assert pick_checkpoints(paths, 1) == ["e9"]


def test_verdict_healthy_run():
    verdict = run_collapse_verdict(series_of([healthy(1), healthy(2)]), HELDOUT, "r")
    assert verdict["collapsed"] is False and verdict["began_epoch"] is None
    assert verdict["signals"] == "" and verdict["warnings"] == ""


def test_verdict_names_the_signal_and_when_it_began():
    rows = [healthy(1), healthy(2, punctuation_share=0.7), healthy(3), healthy(4, punctuation_share=0.8),
            healthy(5, punctuation_share=0.9, top1_share=0.4, unigram_entropy=2.0)]
    verdict = run_collapse_verdict(series_of(rows), HELDOUT, "r")
    assert verdict["collapsed"] is True
    assert verdict["began_epoch"] == 4  # the final unbroken stretch; epoch 2 recovered at 3
    assert verdict["signals"] == "punctuation, one token dominates, low entropy"
    table = signal_table(series_of(rows), HELDOUT)
    assert table.set_index("signal").loc["punctuation", "tripped"]
    assert not table.set_index("signal").loc["repetition", "tripped"]


def test_punctuation_threshold_is_relative_to_heldout_with_a_floor():
    assert not collapse_signals(healthy(1, punctuation_share=0.39), HELDOUT)["punctuation"]  # 2 x 0.2 = 0.4
    assert collapse_signals(healthy(1, punctuation_share=0.41), HELDOUT)["punctuation"]
    low = {**HELDOUT, "punctuation_share": 0.02}  # e.g. char level: the 0.4 floor applies
    assert not collapse_signals(healthy(1, punctuation_share=0.3), low)["punctuation"]


def test_geometry_warnings():
    rows = [healthy(1), healthy(2, embedding_norm=2.0, nn_over_sigma0=1.5)]
    verdict = run_collapse_verdict(series_of(rows), HELDOUT)
    assert verdict["collapsed"] is False
    assert verdict["warnings"] == "rows within noise, table shrank"


@pytest.fixture
def trained_run(smoke_config, tmp_path):
    config = smoke_config.replace(epochs=3, threads=1, checkpoint_every=1)
    train(config, tmp_path / "run")
    return tmp_path / "run"


def test_analyse_run_and_write_verdict(trained_run):
    result = analysis.analyse_run(trained_run, max_checkpoints=2, num_samples=4, steps=5, name="tiny")
    assert list(result.series["epoch"]) == [1, 3]
    assert set(result.geometry) == {1, 3} and result.projection[3].shape[1] == 2
    geometry = result.geometry[3]
    assert len(geometry) == len(json.loads((trained_run / "vocab.json").read_text())["itos"])
    assert {"norm", "nn_distance", "bias", "count", "rank", "punctuation"} <= set(geometry.columns)
    assert geometry.loc[geometry["rank"] == 1, "count"].item() == geometry["count"].max()
    row = result.series.iloc[-1]
    assert row["sigma0"] > 0 and row["nn_over_sigma0"] == pytest.approx(row["nn_distance"] / row["sigma0"])
    assert len(result.samples[3]) == 3 and all(isinstance(t, str) for t in result.samples[3])
    (path,) = analysis.write_verdict([result])
    verdict = json.loads(path.read_text())
    assert verdict["run"] == "tiny" and verdict["checkpoints"] == 2 and "heldout" in verdict
    assert path == RunDir(trained_run).verdict and RunDir(trained_run).series.is_file()


def test_a_run_kept_without_checkpoints_is_read_from_its_recorded_analysis(trained_run, tmp_path, capsys):
    """A committed report keeps a run's analysis/ and not its checkpoints (reference/run_10x): the
    collapse page still puts its series and verdict beside a run that has them."""
    result = analysis.analyse_run(trained_run, max_checkpoints=2, num_samples=4, steps=5, name="tiny")
    analysis.write_verdict([result])
    kept = tmp_path / "run_10x"
    kept.mkdir()
    for name in ("config.yaml", "metrics.csv", "analysis"):
        source = trained_run / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, kept / name)
    recorded = analysis.analyse_run(kept, max_checkpoints=2, num_samples=4, name="x10")
    assert recorded.series["run"].tolist() == ["x10", "x10"]
    assert recorded.series[["epoch", "unigram_entropy", "nn_over_sigma0"]].equals(
        result.series[["epoch", "unigram_entropy", "nn_over_sigma0"]])
    assert recorded.heldout == pytest.approx(result.heldout)
    assert {k: v for k, v in recorded.verdict().items() if k != "run"} == \
        {k: v for k, v in result.verdict().items() if k != "run"}
    assert analysis.with_geometry([result, recorded]) == [result]
    assert "x10: its checkpoints are not kept" in capsys.readouterr().out
    shutil.rmtree(kept / "analysis")  # neither checkpoints nor an analysis: the one line names the fix
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        analysis.analyse_run(kept)


def test_checkpoint_samples_table(trained_run):
    table = rundata.checkpoint_samples_table(trained_run, num_samples=2, steps=4, max_checkpoints=2)
    assert list(table.columns) == ["epoch", "step", "sample", "text"]
    assert list(table["epoch"]) == [1, 1, 3, 3]


def test_run_checkpoints_without_any(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        rundata.run_checkpoints(tmp_path)


def test_analysis_does_not_reexport_textstats():
    assert not hasattr(analysis, "distinct_n") and not hasattr(analysis, "content_tokens")


LAYERS = {"core": 0, "families": 1, "runs": 2, "evaluation": 3, "workbench": 4, "cli": 5}


def test_imports_go_down_the_layers():
    """dlm/core < families < runs < evaluation < workbench < cli: no module imports from a layer
    above its own (a layer may import its own modules). Imports under `if TYPE_CHECKING:` are
    annotations only, never run, and may name an upper layer's types."""
    import ast
    from pathlib import Path

    import dlm

    root = Path(dlm.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] not in LAYERS:
            continue
        own = LAYERS[parts[0]]
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):
            if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
                block.body = []  # annotations only
        for node in ast.walk(tree):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                bits = name.split(".")
                if bits[0] == "dlm" and len(bits) > 1 and LAYERS.get(bits[1], -1) > own:
                    upward.append(f"{path.relative_to(root)} imports {name}")
    assert not upward, upward
