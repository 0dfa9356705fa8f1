import pytest
import torch

from dlm.core.embeddings import nearest_rows
from dlm.core.schedule import sampling_timesteps
from dlm.evaluation.probe import heldout_ids
from dlm.families import gaussian_probe as probe
from dlm.families.gaussian_sampling import sample_progressive
from dlm.runs.build import load_run
from dlm.runs.train import train


@pytest.fixture
def run(smoke_config, tmp_path):
    train(smoke_config.replace(epochs=3, threads=1, embedding_norm="l2"), tmp_path / "run")
    return load_run(tmp_path / "run")


def test_denoising_accuracy_falls_with_noise(run):
    ids = heldout_ids(run, 8)
    assert ids.shape == (8, run.config.seq_len)
    table = probe.denoising_accuracy(run, ids)
    assert list(table["t"]) == probe.probe_timesteps(100) and table["t"].iloc[-1] == 99
    assert table["log_snr"].is_monotonic_decreasing
    first, last = table.iloc[0], table.iloc[-1]
    assert first["own_vector_accuracy"] == 1.0  # at t = 0 every vector is nearest its own row
    assert last["own_vector_accuracy"] < 0.5 and 0 <= last["accuracy"] <= 1 and last["cross_entropy"] > 0
    with pytest.raises(ValueError, match="windows"):
        heldout_ids(run, 10**6)


def test_chain_retention_runs_the_chain_from_the_start_timestep(run):
    ids = heldout_ids(run, 8)
    one = probe.chain_retention(run, ids, start_t=0)
    assert one["chain_steps"] == 1 and one["kept"] == one["first_step_accuracy"]
    middle = probe.chain_retention(run, ids, start_t=50, clamp=True)
    below = [t for t in sampling_timesteps(run.objective.schedule, run.config.sample_steps, run.config.sample_spacing) if t < 50]
    assert middle["chain_steps"] == 1 + len(below)
    assert middle["final_ids"].shape == ids.shape and 0 <= middle["kept"] <= 1


def test_chain_retention_needs_a_shared_timestep(smoke_config, tmp_path):
    train(smoke_config.replace(epochs=1, threads=1, left_to_right=1.0), tmp_path / "l2r")
    l2r = load_run(tmp_path / "l2r")
    with pytest.raises(ValueError, match="left_to_right"):
        probe.chain_retention(l2r, heldout_ids(l2r, 2), start_t=10)


def test_a_chain_started_at_t0_is_one_clamped_step(run):
    ids = heldout_ids(run, 2)
    emb = run.model.embed(ids).detach()
    start = emb + 0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    states = list(sample_progressive(run.model, run.objective, tuple(ids.shape), 20, clamp=True, start=start, start_t=0))
    assert len(states) == 1 and states[0].t == 0  # one step, at t = 0, and clamped onto rows
    table = run.model.table().detach()
    t = torch.zeros(2, dtype=torch.long)
    prediction = run.objective.x0_from_output(run.model, run.model.denoise(start, t), start, t)
    assert torch.equal(states[0].x, table[nearest_rows(prediction, table)])


def test_probe_benchmark_writes_both_tables(run, tmp_path, capsys):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("probe_benchmark", ROOT / "benchmarks" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_dir = str(run.checkpoint.parents[1])
    assert module.main([run_dir, "--windows", "4", "--start_t", "0.2", "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "probe.md").read_text()
    assert "own_vector_accuracy" in text and "first_step_accuracy" in text and f"## {run_dir}" in text
    assert "kept" in capsys.readouterr().out


def test_probe_benchmark_one_step_compares_checkpoints_side_by_side(run, tmp_path, capsys):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("probe_benchmark", ROOT / "benchmarks" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_dir = run.checkpoint.parents[1]
    first = sorted((run_dir / "checkpoints").glob("epoch_*.pt"))[0]
    assert module.main([str(run_dir), str(first), "--one_step", "--windows", "4", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "probe_one_step.md").read_text()
    assert "One-step cross-entropy" in text and "One-step accuracy" in text
    assert f"{first} (step " in text and "kept" not in text  # no chains
    assert not (tmp_path / "probe.md").exists()


@pytest.mark.parametrize("sampling", [{"eta": 1.0}, {"eta": 0.0}, {"eta": 1.0, "x0": "expected"},
                                      {"eta": 0.0, "x0": "expected"}])
def test_a_chain_whose_denoiser_knows_the_words_keeps_every_word(run, sampling, monkeypatch):
    """Fidelity on a toy: the denoiser answers EMB(w) of the held-out words whatever x_t it sees,
    so a faithful sampler ends on exactly those words, from any noise level."""
    ids = heldout_ids(run, 4)
    monkeypatch.setattr(run.model, "denoise", lambda x_t, t, x0_estimate=None, attend=None: run.model.embed(ids))
    for start_t in (40, 99):
        result = probe.chain_retention(run, ids, start_t=start_t, **sampling)
        assert result["first_step_accuracy"] == 1.0 and result["kept"] == 1.0, (start_t, result)


def test_the_calibrated_share_is_the_mean_probability_of_the_right_word():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    assert probe.calibrated_share(logits, torch.tensor([[0, 2]])) == pytest.approx((0.5 + 0.1) / 2)


def test_a_block_run_is_probed_block_by_block(smoke_config, tmp_path, monkeypatch):
    """A block model is asked for each block with the true words before it clean (t = 0) and the
    later blocks left out, as it was trained; the toy denoiser knows the words only when asked so."""
    train(smoke_config.replace(epochs=3, threads=1, embedding_norm="l2", block_size=4), tmp_path / "blocks")
    blocks = load_run(tmp_path / "blocks")
    ids = heldout_ids(blocks, 4)
    clean = blocks.model.embed(ids).detach()

    def denoise(x_t, t, x0_estimate=None, attend=None):
        first = x_t.shape[1] - 4
        t = t if t.ndim == 2 else t[:, None].expand(-1, x_t.shape[1])  # (B,): one timestep for all
        context_clean = bool((t[:, :first] == 0).all()) and torch.allclose(x_t[:, :first], clean[:, :first])
        return clean[:, : x_t.shape[1]] if context_clean else torch.zeros_like(x_t)

    monkeypatch.setattr(blocks.model, "denoise", denoise)
    table = probe.denoising_accuracy(blocks, ids, timesteps=[0, 50, 99])
    assert (table["accuracy"] == 1.0).all()
    for start_t in (40, 99):
        result = probe.chain_retention(blocks, ids, start_t=start_t)
        assert result["first_step_accuracy"] == 1.0 and result["kept"] == 1.0, (start_t, result)
