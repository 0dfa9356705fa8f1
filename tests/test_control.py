"""Classifier-free control (dlm.runs.control, dlm infill) on untrained toy runs: the fixed words are
kept, length control puts the blank line at N and none before, MBR picks the medoid, the CLI writes
its records. The fast lane: no training."""

import json

import pytest
import torch

from dlm.cli import main
from dlm.runs.build import load_run
from dlm.runs.control import (
    hamming_distance,
    infill,
    length_control,
    make_control,
    mbr_select,
    ngram_distance,
    prefix_control,
    template_control,
)
from dlm.runs.sample import SampleOptions
from tests.conftest import toy_run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(toy_run_dir(tmp_path_factory.mktemp("toy") / "run"))


def options(run, **overrides):
    return SampleOptions.from_config(run.config, **{"num_samples": 3, "steps": 5, **overrides})


def pull_rounding_to(run, word: str, strength: float = 100.0):
    """A rounding decoder that says `word` wherever it can: its bias raised far above the rest.
    Returns the undo."""
    bias = run.model.rounding_bias()
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[run.tokenizer.stoi[word]] += strength
    return lambda: bias.data.copy_(saved)


def test_template_tokens_blanks_and_padding(run):
    control = template_control(run, "To be , or not to be : __ __ question")
    words = ["To", "be", ",", "or", "not", "to", "be", ":"]
    assert control.fixed_positions == [*range(8), 10]
    assert [run.tokenizer.itos[i] for i in control.ids[:8]] == words
    assert run.tokenizer.itos[control.ids[10]] == "question"
    assert len(control.ids) == run.config.seq_len and not control.known[11:].any()  # padded with blanks
    assert prefix_control(run, "HAMLET:\\n").fixed_positions == [0, 1, 2]  # \n typed: a line break


def test_infilling_keeps_the_fixed_words_through_the_chain(run):
    control = template_control(run, "To be , or not to be : __ __ __ __ question")
    result = infill(run, control, options(run))
    assert result.ids.shape == (3, run.config.seq_len)
    assert (result.ids[:, control.known] == control.ids[control.known]).all()
    # the hook fixed them in the chain: it ends on their clean embeddings, which the rounding reads
    # as it reads EMB(w) itself (an untrained toy's rounding does not always give w back)
    from dlm.families.gaussian_model import decode

    clean = decode(run.model, run.model.embed(control.ids[None]))[0]
    expected = (clean[control.known] == control.ids[control.known]).float().mean().item()
    assert result.kept_by_rounding == pytest.approx([expected] * 3) and expected > 0.5
    assert all(text.startswith("To be, or not to be:") for text in result.texts)


def test_the_fixed_words_are_guaranteed_when_the_rounding_misses_them(run):
    undo = pull_rounding_to(run, "speak")  # the rounding now says 'speak' everywhere
    try:
        control = template_control(run, "To be , or not to be : __ __ __ __ question")
        result = infill(run, control, options(run))
    finally:
        undo()
    assert (result.ids[:, control.known] == control.ids[control.known]).all()
    assert max(result.kept_by_rounding) < 0.5  # ... and the report says the rounding missed them
    free = result.ids[:, ~control.known]
    assert (free == run.tokenizer.stoi["speak"]).all()


@pytest.mark.parametrize("length", [1, 5, 12])
def test_length_control_ends_the_speech_at_n_and_not_before(run, length):
    newline = run.tokenizer.stoi["\n"]
    undo = pull_rounding_to(run, "\n")  # left alone, the rounding would write blank lines everywhere
    try:
        result = infill(run, length_control(run, length), options(run))
    finally:
        undo()
    for window, text in zip(result.ids, result.texts):
        assert window[:2].tolist() == [newline, newline] and window[length + 2: length + 4].tolist() == [newline] * 2
        speech = window[2: length + 2]
        assert speech[0] != newline and speech[-1] != newline
        assert not ((speech[1:] == newline) & (speech[:-1] == newline)).any()  # no blank line inside
        assert len(run.tokenizer.tokenize(text)) == length and "\n\n" not in text
    assert min(result.masked) >= 1  # the constraint did the work, and says so


def test_mbr_picks_the_medoid():
    candidates = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7, 6], [9, 9, 9, 9, 9]]
    assert mbr_select(candidates, "hamming") == 1
    assert mbr_select(candidates, "ngram") == 1
    assert mbr_select([[4, 4], [4, 4]]) == 0  # a tie goes to the first
    assert hamming_distance([1, 2], [1, 3]) == 0.5
    assert ngram_distance([1, 2, 3], [1, 2, 3]) == 0 and ngram_distance([1, 2], [3, 4]) == 1


def test_infill_with_mbr_returns_one_pick_per_sample(run, monkeypatch):
    import dlm.runs.control as control_module

    seen = []

    def last_of_each_group(candidates, distance):
        seen.append(len(candidates))
        return len(candidates) - 1

    monkeypatch.setattr(control_module, "mbr_select", last_of_each_group)
    plain = infill(run, "__ __ speak", options(run, num_samples=6, seed=3))  # the same draws, no MBR
    picked = infill(run, "__ __ speak", options(run, num_samples=2, seed=3), mbr=3)
    assert seen == [3, 3]
    assert torch.equal(picked.ids, plain.ids[[2, 5]])


def test_ar_continues_a_prefix(tmp_path):
    ar = load_run(toy_run_dir(tmp_path / "ar", model="ar"))
    control = prefix_control(ar, "HAMLET :\\n To be")
    result = infill(ar, control, options(ar))
    assert result.ids.shape == (3, ar.config.seq_len)
    assert (result.ids[:, :5] == control.ids[:5]).all()
    with pytest.raises(ValueError, match="is not available for the .ar. family"):
        make_control(ar, template="To __ be")


def test_cli_prints_and_writes_the_records(tmp_path, capsys):
    run_dir = toy_run_dir(tmp_path / "run")
    out = tmp_path / "out" / "infill.jsonl"
    template = "To be , or not to be : __ __ question"
    assert main(["infill", "--run_dir", str(run_dir), "--template", template, "--num_samples", "2",
                 "--steps", "3", "--mbr", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and printed[-1].endswith(str(out))
    assert printed[:2] == [r["text"].replace("\n", " / ") for r in records]
    for record in records:
        assert record["template"] == template and record["mode"] == "template" and record["mbr"] == 2
        assert record["fixed_positions"] == [*range(8), 10]
        assert [record["ids"][i] for i in record["fixed_positions"]] == record["fixed_ids"]
        assert record["text"].startswith("To be, or not to be:")
    assert main(["infill", "--run_dir", str(run_dir), "--length", "4", "--steps", "3", "--num_samples", "1"]) == 0
    assert len(capsys.readouterr().out.strip().split()) >= 1


def test_a_blanked_window_fixes_everything_but_the_span(tmp_path):
    from dlm.runs.control import blanked_control

    run = load_run(toy_run_dir(tmp_path / "run"))
    window = list(range(2, 2 + run.config.seq_len))
    control = blanked_control(run, window, 3, 6)
    assert control.fixed_positions == [p for p in range(run.config.seq_len) if not 3 <= p < 6]
    assert control.ids[control.known].tolist() == [w for p, w in enumerate(window) if not 3 <= p < 6]
    assert control.given.split()[3:6] == ["__", "__", "__"]
    with pytest.raises(ValueError, match="inside the window"):
        blanked_control(run, window, 5, 5)


def test_a_blanked_bpe_window_reads_as_its_text_and_types_back_to_its_pieces():
    from types import SimpleNamespace

    from dlm.core.data import build_tokenizer
    from dlm.runs.control import BLANK, blanked_control
    from tests.conftest import LINES

    bpe = build_tokenizer("\n\n".join(LINES * 20) + "\n", "bpe", bpe_vocab_size=2000)
    window = bpe.encode("What's this, my countrymen? I'll speak to it though hell itself should gape.")[:16]
    run = SimpleNamespace(tokenizer=bpe, config=SimpleNamespace(seq_len=len(window)))
    control = blanked_control(run, window, 5, 8)
    # the oracle: the tokenizer's own decode of the fixed stretches, blanks between them
    assert control.given == bpe.decode(window[:5]) + BLANK * 3 + bpe.decode(window[8:])
    assert template_control(run, control.given).ids.tolist() == control.ids.tolist()  # typed back: the same pieces
