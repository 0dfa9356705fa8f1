"""dlm train --tensorboard: standard event files in RUN/tensorboard/, read back with TensorBoard's own
reader: the curves metrics.csv holds, validation, the table's geometry, samples, the NLL bound."""
import csv

import pytest

from dlm.cli import main
from dlm.runs.build import load_run
from dlm.runs.rundir import RunDir
from dlm.runs.sample import SampleOptions, generate
from tests.conftest import ROOT, make_corpus

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SMOKE = str(ROOT / "params" / "smoke.yaml")
QUICK = ["--precision", "fp32", "--device", "cpu", "--min_count", "1", "--max_train_tokens", "none", "--epochs", "2",
         "--sample_steps", "5", "--dropout", "0.1", "--ema_decay", "0"]


def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    corpus = make_corpus(root / "corpus.txt")
    run_dir = root / "run"
    assert main(["train", SMOKE, "--run_dir", str(run_dir), "--corpus", str(corpus), *QUICK, "--tensorboard"]) == 0
    return run_dir


def test_the_event_files_hold_the_runs_curves(trained):
    accumulator = events(trained)
    with open(RunDir(trained).metrics, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["total"]]
    assert rows
    for tag, column in (("loss/total", "total"), ("loss/rounding", "rounding"), ("lr", "lr"),
                        ("speed/tokens_per_s", "tokens_per_s"), ("embedding/mean_norm", "embedding_norm"),
                        ("embedding/nn_distance", "nn_distance")):
        curve = scalars(accumulator, tag)
        assert sorted(curve) == [int(row["step"]) for row in rows], tag
        for row in rows:
            assert curve[int(row["step"])] == pytest.approx(float(row[column]), rel=1e-5), tag
    assert len(scalars(accumulator, "val/total")) == 2  # one per epoch
    assert len(accumulator.Histograms("embedding/row_norms")) == 2


def test_the_event_files_hold_decoded_samples(trained):
    accumulator = events(trained)
    texts = [event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors("samples/text_summary")]
    assert len(texts) == 2 and all(text.count("---") == 3 for text in texts)  # four samples at each kept checkpoint
    # the samples of the kept checkpoint's weights, the run's recipe at its 5 steps, seed 0
    run = load_run(trained, RunDir(trained).epoch_checkpoint(2))
    batch = generate(run, SampleOptions.from_config(run.config, num_samples=4, seed=0))
    assert batch.texts[0].strip() and all(text.split("\n")[0] in texts[-1] for text in batch.texts)


def test_the_nll_bound_over_checkpoints_joins_the_curves(trained):
    from dlm.evaluation.likelihood import bound_over_checkpoints

    bounds = bound_over_checkpoints(trained, windows=4, draws=1)
    curve = scalars(events(trained), "nll/bound")
    assert curve == pytest.approx(dict(zip(bounds["step"], bounds["nll_bound"])))


def test_without_the_flag_nothing_is_written_and_the_losses_are_the_same(trained, tmp_path):
    corpus = make_corpus(tmp_path / "corpus.txt")  # the same text as the fixture's
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--corpus", str(corpus), *QUICK]) == 0
    assert not RunDir(tmp_path / "run").tensorboard.exists()

    def losses(run_dir):
        with open(RunDir(run_dir).metrics, newline="") as handle:
            return [(row["step"], row["total"], row["val_total"]) for row in csv.DictReader(handle)]
    # the samples drawn for TensorBoard never touch the training's random numbers
    assert losses(tmp_path / "run") == losses(trained)


def test_without_the_package_the_flag_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import dlm.runs.curves as curves

    monkeypatch.setattr(curves, "available", lambda: False)
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dlm train: error: --tensorboard needs the tensorboard package: pip install tensorboard "
                   "(or pip install -e '.[tensorboard]'), or train without --tensorboard."]
    assert not (tmp_path / "run").exists()
