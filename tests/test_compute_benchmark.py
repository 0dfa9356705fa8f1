"""benchmarks/compute.py: the sweep's plan (which commands are left, resumed or skipped, from the
folders alone), the commands themselves (they parse and load as dlm would), and the compute multiple."""

import importlib.util
import sys

import pytest

from dlm.cli import build_parser, parse_overrides
from dlm.core.checkpoint import save_checkpoint
from dlm.core.config import load_config
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("compute", ROOT / "benchmarks" / "compute.py")
compute = importlib.util.module_from_spec(spec)
sys.modules["compute"] = compute  # its dataclass looks its module up
spec.loader.exec_module(compute)


def trained(folder, step):
    save_checkpoint(folder / "checkpoints" / "last.pt", {"step": step})


def test_a_new_family_plans_the_long_run_then_every_cooldown(tmp_path):
    steps = compute.plan("masked_blocks4", tmp_path, threads=1)
    assert [s.folder.name for s in steps] == ["masked_blocks4", "masked_blocks4_x0.25", "masked_blocks4_x0.5",
                                              "masked_blocks4_x1", "masked_blocks4_x2"]
    long_run = steps[0].argv
    assert long_run[:3] == ["dlm", "train", "params/masked_blocks4.yaml"] and "--resume" not in long_run
    assert long_run[long_run.index("--max_steps") + 1] == "3640" and long_run[long_run.index("--lr_cooldown_steps") + 1] == "520"
    # each cooldown starts at an epoch end of the stable phase and ends at its budget's step
    for step, (epoch, cooldown, budget_steps) in zip(steps[1:], [(3, 33, 228), (6, 65, 455), (12, 130, 910),
                                                                  (24, 260, 1820)]):
        assert step.argv[step.argv.index("--from") + 1].endswith(f"epoch_{epoch:04d}.pt")
        assert int(step.argv[step.argv.index("--cooldown_steps") + 1]) == cooldown
        assert epoch * 65 + cooldown == budget_steps
        assert epoch * 65 + cooldown <= 3640 - 520  # from the stable phase, never the long run's own cooldown


def test_the_plan_skips_what_is_done_and_resumes_what_stopped(tmp_path):
    trained(tmp_path / "ar", 1300)  # the long run, stopped at step 1300
    trained(tmp_path / "ar_x0.25", 228)  # done
    trained(tmp_path / "ar_x0.5", 420)  # a cooldown stopped after a checkpoint
    steps = compute.plan("ar", tmp_path)
    assert [s.folder.name for s in steps] == ["ar", "ar_x0.5", "ar_x1", "ar_x2"]
    assert steps[0].argv[:3] == ["dlm", "train-ar", "params/ar.yaml"] and steps[0].argv[-1] == "--resume"
    assert steps[1].argv[:3] == ["dlm", "train", str(tmp_path / "ar_x0.5" / "config.yaml")] and "--resume" in steps[1].argv
    trained(tmp_path / "ar", 3640)
    for name, step in (("ar_x0.5", 455), ("ar_x1", 910), ("ar_x2", 1820)):
        trained(tmp_path / name, step)
    assert compute.plan("ar", tmp_path) == []


def test_a_cooldown_waits_for_its_source_when_the_long_run_is_done_elsewhere(tmp_path):
    trained(tmp_path / "gaussian", 3640)  # finished, but its epoch checkpoints were deleted
    assert compute.plan("gaussian", tmp_path) == []
    (tmp_path / "gaussian" / "checkpoints" / "epoch_0012.pt").write_bytes(b"")
    assert [s.folder.name for s in compute.plan("gaussian", tmp_path)] == ["gaussian_x1"]


@pytest.mark.parametrize("family", list(compute.FAMILIES))
def test_every_planned_command_is_one_dlm_accepts(family, tmp_path):
    for step in compute.plan(family, tmp_path, threads=1):
        args, extra = build_parser().parse_known_args(step.argv[1:])
        overrides = parse_overrides(extra, args)
        if args.command in ("train", "train-ar") and not args.resume:
            config = load_config(ROOT / args.params, **overrides)
            assert config.lr_decay == "wsd" and config.max_steps == 3640 and not config.calibrate_temperature


def test_the_compute_multiple_follows_a_power_law_between_budgets():
    # perplexity falling as 1 / FLOPs: it halves when compute doubles, so 50 is reached at exactly 2x
    points = [(1.0, 100.0), (4.0, 25.0)]
    assert compute.compute_multiple(points, 50.0, 1.0) == pytest.approx(2.0)
    assert compute.compute_multiple(points, 100.0, 2.0) == pytest.approx(0.5)  # at its first budget already
    assert compute.compute_multiple(points, 10.0, 1.0) is None  # never within the sweep


def test_status_says_when_the_long_run_s_validation_loss_has_risen(tmp_path, capsys):
    folder = tmp_path / "masked"
    folder.mkdir()
    (folder / "metrics.csv").write_text("step,epoch,total,val_total\n50,1,5.0,\n65,1,4.9,4.80\n130,2,4.5,4.40\n"
                                        "195,3,4.2,4.41\n")
    assert compute.validation_trend(folder) == "val loss lowest 4.4000 at step 130, latest 4.4100 at step 195"
    (folder / "metrics.csv").write_text("step,epoch,total,val_total\n65,1,4.9,4.80\n130,2,4.5,4.40\n195,3,4.2,4.60\n")
    assert compute.validation_trend(folder).endswith("latest 4.6000 at step 195: risen over 1% since, it overfits")
    assert compute.validation_trend(tmp_path / "ar") == ""
    compute.status(tmp_path)
    assert "it overfits" in capsys.readouterr().out
