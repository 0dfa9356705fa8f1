"""Teacher perplexity at matched entropy: the temperature search and the samples it scores."""

import dataclasses
import json
import math

import pytest
import torch

from dlm.cli import main
from dlm.evaluation.matched import (
    MAX_TEMPERATURE,
    entropy_of,
    find_temperature,
    heldout_entropy,
    match_entropy,
    target_checks,
    temperature_sampler,
)
from dlm.runs.build import load_run
from dlm.runs.sample import SampleOptions, generate
from tests.conftest import toy_run_dir


def saturating(temperature: float) -> float:
    return 2.0 + 3.0 * temperature / (1.0 + temperature)  # 2 bits at 0, rising toward 5


def test_find_temperature_hits_the_target_in_few_draws():
    asked = []

    def counted(temperature):
        asked.append(temperature)
        return saturating(temperature)

    temperature, entropy = find_temperature(counted, 4.1, tolerance=0.001)
    assert abs(entropy / 4.1 - 1) <= 0.001
    assert temperature == pytest.approx(7 / 3, rel=0.01)  # 2 + 3 * (7/3) / (10/3) = 4.1
    # 0, 0.5, 1, 2, 4 bracket it; bisection of [2, 4] to 0.1% of the entropy takes 6 more draws
    assert len(asked) <= 5 + 3, asked
    # a steep rise far from linear (entropy a step-like function of temperature) still converges
    temperature, entropy = find_temperature(lambda t: 2.0 + 3.0 * math.tanh(20 * max(t - 1.3, 0.0)), 4.0)
    assert abs(entropy / 4.0 - 1) <= 0.01 and 1.3 < temperature < 1.4


def test_find_temperature_stops_at_the_argmax_or_the_ceiling():
    assert find_temperature(saturating, 1.5) == (0.0, 2.0)  # argmax already above: cannot go lower
    temperature, entropy = find_temperature(saturating, 6.0)  # never reached
    assert temperature == MAX_TEMPERATURE and entropy < 5.0


def test_targets_met_when_samples_and_heldout_text_both_copy_nothing():
    """0/0 is no ratio: samples that copy no 4-gram where held-out text copies none meet "at most
    2x"; any copying against held-out text's 0 does not; the other targets read as before."""
    heldout = {"teacher_perplexity": 40.0, "punctuation_share": 0.2, "types_at_100": 50, "copy_rate_4gram": 0.0}
    same = dict(heldout)
    assert target_checks(same, heldout, "types_at_100") == dict.fromkeys(
        ("teacher_perplexity", "punctuation_share", "types_at", "copy_rate_4gram"), True)
    copying = {**heldout, "copy_rate_4gram": 0.05}
    assert target_checks(copying, heldout, "types_at_100")["copy_rate_4gram"] is False
    worse = {"teacher_perplexity": 401.0, "punctuation_share": 0.24, "types_at_100": 39, "copy_rate_4gram": 0.0}
    assert not any(v for k, v in target_checks(worse, heldout, "types_at_100").items() if k != "copy_rate_4gram")
    twice = {**heldout, "copy_rate_4gram": 0.2}
    assert target_checks(twice, {**heldout, "copy_rate_4gram": 0.1}, "types_at_100")["copy_rate_4gram"] is True


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    from tests.conftest import make_corpus

    root = tmp_path_factory.mktemp("matched")
    corpus = str(make_corpus(root / "corpus.txt"))
    return (toy_run_dir(root / "gaussian", corpus=corpus), toy_run_dir(root / "ar", model="ar", corpus=corpus))


def test_the_cached_chain_redraws_exactly_what_dlm_sample_draws(toy_runs):
    run = load_run(toy_runs[0])
    options = SampleOptions.from_config(run.config, num_samples=6, seed=3)
    draw = temperature_sampler(run, options)
    for temperature in (0.0, 0.7, 2.0):
        expected = generate(run, dataclasses.replace(options, temperature=temperature)).ids
        assert torch.equal(draw(temperature), expected)


@pytest.mark.parametrize("which", [0, 1])  # the diffusion run (cached chain) and the AR run (sampled afresh)
def test_match_entropy_scores_samples_at_heldout_entropy(toy_runs, which):
    run, teacher = load_run(toy_runs[which]), load_run(toy_runs[1])
    options = SampleOptions.from_config(run.config, num_samples=16)
    result = match_entropy(run, teacher, options)
    assert result["matched"] and result["temperature"] > 0
    scored = result["samples"]["unigram_entropy"]
    assert abs(scored / result["target_entropy"] - 1) <= 0.01
    assert result["target_entropy"] == pytest.approx(result["heldout"]["unigram_entropy"])
    assert scored == pytest.approx(entropy_of(run, temperature_sampler(run, options)(result["temperature"])))
    assert result["ratios"]["teacher_perplexity"] == pytest.approx(
        result["samples"]["teacher_perplexity"] / result["heldout"]["teacher_perplexity"])
    assert set(result["targets"]) == {"teacher_perplexity", "punctuation_share", "types_at", "copy_rate_4gram"}
    assert set(result["ratios"]) == set(result["targets"]) | {"unigram_entropy"}  # the same names, whatever the count


def test_match_entropy_scores_at_an_asked_entropy(toy_runs):
    """--entropy: the samples are scored at the asked bits, not held-out text's; the ratios stay
    against held-out text."""
    run, teacher = load_run(toy_runs[0]), load_run(toy_runs[1])
    options = SampleOptions.from_config(run.config, num_samples=16)
    heldout = match_entropy(run, teacher, options)
    asked = heldout["target_entropy"] * 1.02  # within what the toy vocabulary can spend
    result = match_entropy(run, teacher, options, entropy=asked)
    assert result["target_entropy"] == asked and result["temperature"] > heldout["temperature"]
    redrawn = entropy_of(run, temperature_sampler(run, options)(result["temperature"]))
    assert abs(redrawn / asked - 1) <= 0.01
    assert result["heldout"]["unigram_entropy"] == pytest.approx(heldout["heldout"]["unigram_entropy"])


def test_cli_prints_and_writes_the_matched_row(toy_runs, tmp_path, capsys):
    out = tmp_path / "new_folder" / "matched.json"  # the folder is made, as dlm sample makes its --out's
    assert main(["evaluate", "--matched", "--run_dir", str(toy_runs[0]), "--teacher", str(toy_runs[1]),
                 "--num_samples", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "within 5% of held-out" in printed and "targets met:" in printed
    assert json.loads(out.read_text())["matched"] is True


def test_matched_bad_inputs_give_one_clear_line(toy_runs, tmp_path, capsys):
    diffusion, ar = map(str, toy_runs)
    (tmp_path / "afile").write_text("")
    cases = [
        (["--run_dir", diffusion], "--matched needs --run_dir RUN"),
        (["--run_dir", diffusion, "--teacher", diffusion], "The teacher must be an autoregressive run"),
        (["--run_dir", diffusion, "--teacher", ar, "--num_samples", "0"], "num_samples must be at least 1"),
        (["--run_dir", diffusion, "--teacher", ar, "--steps", "51"], "steps must be between 1 and the run's"),
        (["--run_dir", diffusion, "--teacher", ar, "--entropy", "0"], "--entropy is a unigram entropy in bits"),
        (["--run_dir", diffusion, "--teacher", ar, "--entropy", "nan"], "--entropy is a unigram entropy in bits"),
        (["--run_dir", diffusion, "--teacher", ar, "--checkpoint", str(tmp_path / "no.pt")], "no.pt"),
        (["--run_dir", diffusion, "--teacher", ar, "--json", str(tmp_path / "afile" / "x.json")], "afile"),
    ]
    for args, message in cases:
        assert main(["evaluate", "--matched", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)


def test_each_temperature_is_drawn_once(toy_runs, monkeypatch):
    """The AR model is sampled afresh per temperature: the search, the scoring and a later argmax
    query must not generate the same temperature twice."""
    import dlm.evaluation.matched as matched

    temperatures = []

    def counting_generate(run, options, device="cpu"):
        temperatures.append(options.temperature)
        return generate(run, options, device)

    monkeypatch.setattr(matched, "generate", counting_generate)
    ar = load_run(toy_runs[1])
    options = SampleOptions.from_config(ar.config, num_samples=8)
    draw = temperature_sampler(ar, options)
    result = matched.score_at_entropy(ar, ar, draw, matched.heldout_entropy(ar, 8))
    draw(0.0), draw(result["temperature"])
    assert len(temperatures) == len(set(temperatures)) > 1


def test_a_run_scored_by_a_teacher_of_another_tokenizer_is_matched_where_it_is_scored(tmp_path):
    # A BPE run scored by a word teacher: the entropy the search matches must be the one evaluate_samples
    # then reports, for the samples and for held-out text alike. The "sampler" here is held-out text
    # itself with the tail of each window overwritten by one piece (entropy rises with temperature and
    # reaches held-out text's at t >= 2), so at the matched temperature it IS held-out text.
    from dlm.core.config import load_config
    from dlm.core.textstats import heldout_windows
    from dlm.evaluation.matched import score_at_entropy
    from dlm.evaluation.rundata import run_data
    from dlm.runs.train import train
    from tests.conftest import LINES, ROOT, make_corpus

    corpus = make_corpus(tmp_path / "corpus.txt")
    config = load_config(ROOT / "params" / "smoke.yaml", corpus=str(corpus), max_train_tokens=None, progress=False,
                         tokenizer="bpe", bpe_vocab_size=2000, epochs=1, precision="fp32", device="cpu")
    train(config, tmp_path / "bpe")
    run = load_run(tmp_path / "bpe")
    # the teacher knows only some of the words: the rest read as <unk>, as a BPE run's new words do
    teacher = load_run(toy_run_dir(tmp_path / "ar", model="ar", corpus=str(corpus), text="\n".join(LINES[:12]) + "\n"))
    text = heldout_windows(run_data(run).val_ids, run.config.seq_len, 16)
    filler = run.tokenizer.encode(" the")[0]

    def draw(temperature: float) -> torch.Tensor:
        kept = int(text.shape[1] * min(1.0, temperature / 2))
        ids = text.clone()
        ids[:, kept:] = filler
        return ids

    result = score_at_entropy(run, teacher, draw, heldout_entropy(run, len(text), teacher))
    samples, heldout = result["samples"]["unigram_entropy"], result["heldout"]["unigram_entropy"]
    assert result["matched"] and result["target_entropy"] == pytest.approx(heldout)
    assert abs(samples / heldout - 1) <= 0.011
