"""The CUDA path: the same training step, sampling and checkpoints on a GPU as on the CPU. Every
test here skips on a machine without CUDA (CI has none); benchmarks/gpu_check.sh runs them on one."""

import pytest
import torch
import torch.nn.functional as F

from dlm.core.embeddings import LearnedEmbedding, LearnedRounding
from dlm.core.runtime import autocast, pick_device, resolved_precision
from dlm.runs.build import build_objective, load_run, new_model
from dlm.runs.sample import SampleOptions, generate
from dlm.runs.state import build_optimizer, train_step
from dlm.runs.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def test_auto_picks_the_gpu_and_bf16():
    assert pick_device("auto").type == "cuda"
    assert resolved_precision("auto", "cuda") == "bf16"


def test_chunked_rounding_loss_on_cuda_matches_cross_entropy():
    torch.manual_seed(0)
    table = LearnedEmbedding(300, 16, norm="l2").cuda()
    head = LearnedRounding(16, 300, tied_embedding=table).cuda()
    x = torch.randn(4, 9, 16, device="cuda", requires_grad=True)
    ids = torch.randint(0, 300, (4, 9), device="cuda")
    plain = F.cross_entropy(head(x).reshape(-1, 300), ids.reshape(-1))
    chunked = head.loss(x, ids)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    grad_plain, = torch.autograd.grad(plain, x)
    grad_chunked, = torch.autograd.grad(chunked, x)
    assert torch.allclose(grad_plain, grad_chunked, atol=1e-6)


@pytest.mark.parametrize("model_kind", ["gaussian", "ar"])
def test_a_fp32_training_step_on_cuda_matches_the_cpu_step(smoke_config, model_kind):
    """Same weights, same batch, same noise: the updated parameters agree to float tolerance."""
    config = smoke_config.replace(model=model_kind, precision="fp32", dropout=0.0, ema_decay=0.0)
    ids = torch.randint(0, 50, (4, config.seq_len))
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = new_model(config, 50).to(device)
        objective = build_objective(config)
        optimizer = build_optimizer(model, config)
        torch.manual_seed(1)
        # the noise is drawn from a CPU generator inside the loss, so both devices see the same draws
        with autocast("fp32", device):
            losses = objective.training_losses(model, ids.to(device), generator=torch.Generator().manual_seed(2))
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        results.append(({k: v.item() for k, v in losses.items()},
                        {n: p.detach().cpu() for n, p in model.named_parameters()}))
    (cpu_losses, cpu_params), (gpu_losses, gpu_params) = results
    for term in cpu_losses:
        assert gpu_losses[term] == pytest.approx(cpu_losses[term], rel=1e-3, abs=1e-5), term
    for name in cpu_params:
        assert torch.allclose(cpu_params[name], gpu_params[name], atol=1e-4), name


def test_train_on_cuda_then_load_and_sample_on_either_device(smoke_config, tmp_path):
    config = smoke_config.replace(device="cuda", max_steps=6, epochs=1)
    result = train(config, tmp_path / "run")
    assert result.step == 6 and all(torch.isfinite(torch.tensor(v)) for k, v in result.last_metrics.items()
                                    if k in ("total", "mse", "rounding"))
    for device in ("cuda", "cpu"):
        run = load_run(tmp_path / "run", device=device)
        batch = generate(run, SampleOptions(num_samples=3, steps=10), device=device)
        assert batch.ids.shape == (3, config.seq_len) and len(batch.texts) == 3


def test_bf16_training_step_on_cuda_stays_close_to_fp32(smoke_config):
    config = smoke_config.replace(precision="bf16", dropout=0.0, ema_decay=0.0)
    torch.manual_seed(0)
    model = new_model(config, 50).cuda()
    objective = build_objective(config)
    ids = torch.randint(0, 50, (8, config.seq_len), device="cuda")
    plain = objective.training_losses(model, ids, generator=torch.Generator().manual_seed(0))
    with autocast("bf16", "cuda"):
        mixed = objective.training_losses(model, ids, generator=torch.Generator().manual_seed(0))
    for term in ("mse", "rounding", "total"):
        assert mixed[term].dtype == torch.float32
        assert mixed[term].item() == pytest.approx(plain[term].item(), rel=0.05), term
    optimizer = build_optimizer(model, config)
    losses = train_step(model, objective, optimizer, ids, config)
    assert torch.isfinite(losses["total"]).item()
