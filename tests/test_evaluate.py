import pytest

from dlm.evaluation.evaluate import (
    adjacent_repetition,
    compare,
    copy_rate,
    js_divergence,
    ngram_set,
    types_at,
    unigram_distribution,
)

HELDOUT = [("To be , or not to be : that is the question . " * 3).split(),
           ("Now is the winter of our discontent made glorious summer by this sun of York ; " * 2).split()]
TRAIN = ("To be , or not to be : that is the question . Now is the winter of our discontent "
         "made glorious summer by this sun of York ; and all the clouds that lour'd upon our house").split()


def test_js_divergence_bounds():
    p = unigram_distribution(["a", "b", "a"])
    assert js_divergence(p, p) == pytest.approx(0.0)
    assert js_divergence(p, unigram_distribution(["c", "d"])) == pytest.approx(1.0)
    middle = js_divergence(p, unigram_distribution(["a", "c"]))
    assert 0 < middle < 1


def test_spread_repetition_and_copying():
    assert types_at(["a", "b", "a", "c"], 3) == 2
    assert adjacent_repetition([["a", "a", "b", "b"], ["c", "d"]]) == pytest.approx(2 / 4)
    grams = ngram_set(TRAIN, 4)
    assert copy_rate([TRAIN[:8]], grams) == 1.0
    assert copy_rate([["x", "y", "z", "w", "v"]], grams) == 0.0


def test_held_out_text_is_not_collapsed_and_commas_are():
    fine = compare(HELDOUT, HELDOUT, TRAIN)
    assert not fine["collapsed"] and fine["samples"]["js_divergence"] == pytest.approx(0.0)
    commas = [[",", ":", ",", ",", "the", ","] * 5] * 2
    bad = compare(commas, HELDOUT, TRAIN)
    assert bad["collapsed"] and {"punctuation", "low entropy"} <= set(bad["collapse_reasons"])
    assert bad["samples"]["punctuation_share"] > 0.8 and bad["heldout"]["punctuation_share"] < 0.2


def test_quality_vs_steps_scores_each_count_against_held_out_text(tmp_path, smoke_config):
    from dlm.evaluation.evaluate import quality_vs_steps
    from dlm.runs.build import load_run
    from dlm.runs.sample import SampleOptions
    from dlm.runs.train import train
    from dlm.workbench import plots

    train(smoke_config, tmp_path / "run")
    run = load_run(tmp_path / "run")
    curve = quality_vs_steps(run, [8, 2, 8, 4], SampleOptions.from_config(run.config, num_samples=4, clamp=False))
    chains, heldout = curve[curve["steps"].notna()], curve[curve["steps"].isna()]
    assert list(chains["steps"]) == [2, 4, 8] and len(heldout) == 1
    assert chains["agreement"].iloc[-1] == 1.0 and (chains["agreement"] <= 1).all()
    assert (chains["seconds"] > 0).all() and chains["unigram_entropy"].between(0, 20).all()
    assert chains["teacher_perplexity"].isna().all()  # no teacher given
    assert heldout["punctuation_share"].iloc[0] > 0
    figure = plots.quality_vs_steps(curve)
    assert len(figure.axes) == 4  # no perplexity panel without a teacher
