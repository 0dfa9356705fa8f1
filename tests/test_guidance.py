"""Classifier-guided control: the attribute rules, the classifiers' checkpoints, the guidance hook
inside the sampler's inference-mode chain, and the control table on toy runs."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dlm.cli import main
from dlm.core.checkpoint import CheckpointError
from dlm.core.config import load_config
from dlm.core.data import Tokenizer
from dlm.evaluation.control import COLUMNS, ArBaseline, GuidanceSettings, control_table, markdown, rejection_pick
from dlm.families.gaussian_guidance import chain_scheduler, guidance_hook
from dlm.families.gaussian_model import DiffusionLM
from dlm.families.gaussian_sampling import sample_chain
from dlm.runs.build import build_objective, load_run
from dlm.runs.classifier import attribute, load_classifier, save_classifier, train_classifier
from dlm.runs.guidance import guided_ids
from dlm.runs.rundir import RunDir
from dlm.runs.sample import SampleOptions, generate
from tests.conftest import ROOT, make_corpus

SMOKE = str(ROOT / "params" / "smoke.yaml")
QUICK = ["--max_steps", "2", "--precision", "fp32", "--device", "cpu", "--min_count", "1", "--max_train_tokens", "none"]


class MeanClassifier(nn.Module):
    """A toy p(A | x_t, t): logit 4 * mean(x); guidance toward A must raise the latents' mean."""

    def forward(self, x, t):
        score = 4 * x.flatten(1).mean(1)
        return torch.stack([-score, score], dim=1) / 2


def bayes_toy():
    """A diffusion model whose denoiser is the exact posterior mean for a N(0, I) prior,
    E[x0 | x_t] = sqrt(a_t) x_t: every push the guidance gives x survives to the end."""
    config = load_config(None, embed_dim=4, width=8, depth=1, heads=2, seq_len=6, diffusion_steps=100,
                         sample_steps=20, dropout=0.0, clamp=False)
    model, diffusion = DiffusionLM(config, vocab_size=9).eval(), build_objective(config)
    roots = diffusion.schedule.sqrt_alphas_cumprod
    model.denoise = lambda x_t, t, x0_estimate=None, attend=None: roots[t].view(-1, 1, 1) * x_t
    return SimpleNamespace(config=config, model=model, objective=diffusion, checkpoint="toy")


def final_log_prob(run, strength, fluency=1.0, seed=0):  # lambda 1: the exact Gaussian term
    options = SampleOptions.from_config(run.config, num_samples=16)
    hooks = [guidance_hook(MeanClassifier(), chain_scheduler(run, options), strength, fluency)]
    states = list(sample_chain(run.model, run.objective, options, (16, 6), generator=torch.Generator().manual_seed(seed),
                               hooks=hooks))
    return torch.log_softmax(MeanClassifier()(states[-1].x, None), -1)[:, 1].mean().item()


def test_guidance_raises_the_classifiers_log_prob_and_the_fluency_term_holds_it_back():
    run = bayes_toy()
    unguided = final_log_prob(run, 0.0)
    weak, strong = final_log_prob(run, 0.05), final_log_prob(run, 0.3)
    assert unguided + 0.1 < weak < strong  # same seed, same noise: only the guidance differs
    # the fluency term holds it back: without it guidance goes further, an overwhelming weight keeps
    # every step at the denoiser's own mean
    assert final_log_prob(run, 0.3, fluency=0.0) > strong + 0.3
    assert abs(final_log_prob(run, 0.3, fluency=1e8) - unguided) < 0.01


def test_guidance_hook_refuses_a_chain_it_was_not_built_for():
    run = bayes_toy()
    options = SampleOptions.from_config(run.config, num_samples=2)
    hook = guidance_hook(MeanClassifier(), chain_scheduler(run, options), 0.1)
    other = SampleOptions.from_config(run.config, num_samples=2, steps=10)
    with pytest.raises(RuntimeError, match="out of step with the chain"):
        list(sample_chain(run.model, run.objective, other, (2, 6), generator=torch.Generator().manual_seed(0),
                          hooks=[hook]))


def test_guidance_refuses_a_block_diffusion_run_with_one_clear_line():
    run = bayes_toy()
    run.config.block_size = 2
    run.objective = build_objective(run.config)
    with pytest.raises(ValueError, match="samples in blocks"):
        chain_scheduler(run, SampleOptions.from_config(run.config, num_samples=2))


def test_attribute_rules_label_windows_from_their_ids():
    tok = Tokenizer("word", ["<pad>", "<unk>", "ROMEO", ":", "?", "love", "\n"])
    ids = lambda words: torch.tensor([[tok.stoi[w] for w in words]])  # noqa: E731
    assert attribute("question", tok).label(ids(["love", "?"])).item() == 1
    assert attribute("question", tok).label(ids(["love", "love"])).item() == 0
    assert attribute("word:love", tok).label(ids(["?", "love"])).item() == 1
    speaker = attribute("speaker:ROMEO", tok)
    assert speaker.label(ids(["\n", "ROMEO", ":"])).item() == 1
    assert speaker.label(ids(["ROMEO", "?", ":"])).item() == 0  # the name alone is not a speaker tag
    for bad, message in (("colour:red", "Unknown attribute 'colour:red'"), ("word:", "Unknown attribute"),
                         ("word:Juliet", "'Juliet' is not a word of the run's vocabulary")):
        with pytest.raises(ValueError, match=message):
            attribute(bad, tok)
    assert rejection_pick(torch.tensor([0.1, 0.7, 0.9, 0.2, 0.3, 0.4]), 3).tolist() == [1, 5]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A smoke diffusion run and a smoke AR run (two steps each), and tiny classifiers."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("guided")
    corpus = make_corpus(root / "corpus.txt")
    for name, command in (("gaussian", "train"), ("ar", "train-ar")):
        assert main([command, SMOKE, "--run_dir", str(root / name), "--corpus", str(corpus), *QUICK]) == 0
    run = load_run(root / "gaussian")
    for kind in ("latent", "judge"):
        result = train_classifier(run, "question", kind, steps=5, batch_size=8, width=16, depth=1)
        save_classifier(RunDir(root / "gaussian").classifier(kind, "question"), result, run)
    return root


def test_strength_zero_draws_what_dlm_sample_draws(runs):
    run = load_run(runs / "gaussian")
    guide = load_classifier(RunDir(run.checkpoint.parents[1]).classifier("latent", "question"), run, "latent")
    options = SampleOptions.from_config(run.config, num_samples=5, steps=8, seed=3, batch_size=3, clamp=False)
    assert torch.equal(guided_ids(run, options, guide, strength=0.0), generate(run, options).ids)
    assert not torch.equal(guided_ids(run, options, guide, strength=1.0), generate(run, options).ids)


def test_classifier_checkpoint_round_trips_and_a_corrupt_one_is_a_clear_error(runs, tmp_path):
    run = load_run(runs / "gaussian")
    result = train_classifier(run, "question", "latent", steps=3, batch_size=8, width=16, depth=1)
    assert set(result.metrics) >= {"train_positive_share", "heldout_balanced_accuracy_low_t"}
    path = save_classifier(tmp_path / "q.pt", result, run)
    loaded = load_classifier(path, run, "latent", "question")
    x, t = torch.randn(3, run.config.seq_len, run.model.embed_dim), torch.tensor([0, 5, 50])
    assert torch.equal(loaded(x, t), result.classifier(x, t))
    with pytest.raises(CheckpointError, match="is a latent classifier; a judge classifier is needed"):
        load_classifier(path, run, "judge")
    with pytest.raises(CheckpointError, match="classifies 'question', not 'word:speak'"):
        load_classifier(path, run, "latent", "word:speak")
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or not a dlm checkpoint|failed its checksum"):
        load_classifier(path, run, "latent")
    with pytest.raises(CheckpointError, match="Train one with: dlm train-classifier"):
        load_classifier(tmp_path / "none.pt", run, "latent", "question")


def test_control_table_rows_and_cli(runs, tmp_path, capsys):
    run, ar = load_run(runs / "gaussian"), load_run(runs / "ar")
    folder = RunDir(runs / "gaussian")
    classifiers = {"question": tuple(load_classifier(folder.classifier(k, "question"), run, k) for k in ("latent", "judge"))}
    options = SampleOptions.from_config(run.config, num_samples=4, steps=5)
    table = control_table(run, classifiers, options, GuidanceSettings([0.1]), ArBaseline(ar, candidates=2))
    assert list(table.columns) == list(COLUMNS)
    assert table["method"].tolist() == ["gaussian", "gaussian + guidance", "AR", "AR + rejection (best of 2)",
                                        "held-out text"]
    assert table["success_rule"].between(0, 1).all() and (table["teacher_ppl"] > 1).all()
    assert markdown(table).count("\n") == 2 + len(table)
    out = tmp_path / "table"
    assert main(["control-table", "--run_dir", str(runs / "gaussian"), "--ar_run", str(runs / "ar"), "--attribute",
                 "question", "--strengths", "0.1", "--num_samples", "2", "--steps", "4", "--ar_candidates", "2",
                 "--out_dir", str(out), "--device", "cpu"]) == 0
    assert (out / "control.csv").read_text().count("\n") == 6 and "| question | gaussian |" in (out / "control.md").read_text()
