"""decode_unk / --no-unk: a final token is never <unk>, on every path a sample's words are made by
(a whole-window chain, a block chain, the matched-entropy redraws, the AR model, dlm sample)."""
import dataclasses
import json

import pytest
import torch

from dlm import cli
from dlm.core.checkpoint import load_checkpoint, save_checkpoint
from dlm.evaluation.matched import temperature_sampler
from dlm.runs.build import load_run
from dlm.runs.sample import SampleOptions, generate
from tests.conftest import make_corpus, toy_run_dir

RUNS = {"whole window": {}, "blocks of 4": {"block_size": 4}, "ar": {"model": "ar"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unk")
    corpus = str(make_corpus(root / "corpus.txt"))
    return {name: toy_run_dir(root / name.replace(" ", "_"), corpus=corpus, **overrides)
            for name, overrides in RUNS.items()}


def unk_loving(run_dir):
    """The run with its output bias pushed toward <unk>: untouched, most of its words are <unk>."""
    run = load_run(run_dir)
    head = run.model.head if run.config.model == "ar" else run.model.rounding
    with torch.no_grad():
        head.output_bias[run.tokenizer.unk_id] += 30.0
    return run


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_unk_removes_unk_from_the_samples(runs, name, temperature):
    run = unk_loving(runs[name])
    options = SampleOptions.from_config(run.config, num_samples=4, temperature=temperature)
    assert options.unk  # the default recipe keeps <unk>
    allowed = generate(run, options).ids
    assert (allowed == run.tokenizer.unk_id).float().mean() > 0.5
    banned = generate(run, dataclasses.replace(options, unk=False)).ids
    assert not (banned == run.tokenizer.unk_id).any()


def test_the_recipe_key_and_the_matched_redraws_follow_it(runs):
    run = unk_loving(runs["whole window"])
    run.config = run.config.replace(decode_unk=False)
    options = SampleOptions.from_config(run.config, num_samples=4)
    assert not options.unk
    draw = temperature_sampler(run, options)
    for temperature in (0.0, 2.0):
        assert not (draw(temperature) == run.tokenizer.unk_id).any()


def test_dlm_sample_no_unk(runs, tmp_path):
    # the CLI loads the run itself: make the checkpoint's own bias favour <unk>
    run = unk_loving(runs["whole window"])
    checkpoint = tmp_path / "unk.pt"
    payload = load_checkpoint(runs["whole window"] / "checkpoints" / "last.pt")
    save_checkpoint(checkpoint, {**payload, "model": run.model.state_dict()})
    for flag, expect_unk in (("--unk", True), ("--no-unk", False)):
        out = tmp_path / f"samples{flag}.jsonl"
        cli.main(["sample", "--run_dir", str(runs["whole window"]), "--checkpoint", str(checkpoint),
                  "--num_samples", "3", flag, "--out", str(out)])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        has_unk = any(run.tokenizer.unk_id in row["ids"] for row in rows)
        assert has_unk == expect_unk and all(row["unk"] == expect_unk for row in rows)
