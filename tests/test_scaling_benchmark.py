"""benchmarks/scaling.py on untrained toy runs: one row per run, the AR and held-out rows, the
numbers each row carries taken from the bound and the matched-entropy search (nothing timed)."""

import csv
import importlib.util
import math

import pytest

from tests.conftest import ROOT, capable, make_corpus, toy_run_dir


def load_scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_table_has_every_row(tmp_path, capsys):
    scaling = load_scaling()
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    run, ar = toy_run_dir(tmp_path / "d", corpus=corpus), toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus)
    checkpoint = run / "checkpoints" / "last.pt"
    assert scaling.main([f"one={run}", f"same={checkpoint}", "--teacher", str(ar), "--samples", "8",
                         "--seeds", "2", "--windows", "4", "--draws", "1", "--speed_steps", "7",
                         "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "scaling.csv")))
    assert [r["row"] for r in rows] == ["one", "same", "AR (the teacher, self-scored)", "held-out text"]
    one, same, teacher, heldout = rows
    assert one["nll_bound"] == same["nll_bound"] and one["teacher_ppl"] == same["teacher_ppl"]  # one checkpoint
    assert float(one["nll_bound"]) > float(teacher["nll_bound"]) > 0  # an untrained bound is far above the AR's
    for row in (one, teacher):
        assert row["matched"] == "True"
        assert float(row["entropy"]) == pytest.approx(float(heldout["entropy"]), rel=0.011)
        assert float(row["ppl_min"]) <= float(row["teacher_ppl"]) <= float(row["ppl_max"])
        assert float(row["samples_per_s"]) > 0 and float(row["samples_per_cpu_s"]) > 0
    assert float(one["speed_steps"]) == 7  # the chain at --speed_steps, not the run's own sample_steps (5)
    assert "ppl range" in capsys.readouterr().out


def test_no_ar_leaves_out_the_teachers_row(tmp_path):
    scaling = load_scaling()
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    run, ar = toy_run_dir(tmp_path / "d", corpus=corpus), toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus)
    assert scaling.main([f"one={run}", "--teacher", str(ar), "--samples", "4", "--windows", "2", "--draws", "1",
                         "--no_ar", "--out", str(tmp_path / "out")]) == 0
    assert [r["row"] for r in csv.DictReader(open(tmp_path / "out" / "scaling.csv"))] == ["one", "held-out text"]


def test_scaling_refuses_a_row_without_a_label(capsys):
    assert load_scaling().main(["runs/default", "--teacher", "runs/ar"]) == 2
    assert "is not LABEL=PATH" in capsys.readouterr().err


def test_an_ar_row_is_refused_naming_the_families_whose_runs_can_be_rows():
    from types import SimpleNamespace

    from dlm.core.errors import UserError

    with pytest.raises(UserError, match=f"give runs of {capable('likelihood_bound')} as rows"):
        load_scaling().check_row(SimpleNamespace(config=SimpleNamespace(model="ar")), None, None)


def test_rows_above_heldout_entropy_meet_at_a_common_one(tmp_path):
    from dlm.runs.build import load_run

    scaling = load_scaling()
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    run = load_run(toy_run_dir(tmp_path / "d", corpus=corpus))
    teacher = load_run(toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus))
    args = scaling.parse_args(["x=y", "--teacher", "t", "--samples", "8"])
    samplers = [scaling.Row(run, teacher, args), scaling.Row(teacher, teacher, args)]
    heldout = samplers[0].results[0]["heldout"]["unigram_entropy"]
    rows = [{}, {}]
    assert scaling.score_at_common_entropy(rows, samplers, heldout) is None  # both reach held-out's
    samplers[1].argmax_entropy = heldout * 1.06  # as if this row's argmax were above held-out entropy
    column = scaling.score_at_common_entropy(rows, samplers, heldout)
    assert column == f"ppl at {heldout * 1.06:.2f} bits"
    at_common = samplers[0].at(heldout * 1.06)[0]
    assert rows[0][column] == at_common["samples"]["teacher_perplexity"]
    assert abs(at_common["samples"]["unigram_entropy"] / (heldout * 1.06) - 1) <= 0.01


def test_entropy_scores_every_row_at_the_bits_asked(tmp_path, capsys):
    scaling = load_scaling()
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    run, ar = toy_run_dir(tmp_path / "d", corpus=corpus), toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus)
    common = [f"one={run}", "--teacher", str(ar), "--samples", "8", "--windows", "2", "--draws", "1",
              "--speed_steps", "2", "--out", str(tmp_path / "out")]
    assert scaling.main(common) == 0
    heldout = float(list(csv.DictReader(open(tmp_path / "out" / "scaling.csv")))[-1]["entropy"])
    target = heldout * 1.04
    assert scaling.main([*common, "--entropy", str(target), "--tolerance", "0.001"]) == 0
    one, teacher, text = list(csv.DictReader(open(tmp_path / "out" / "scaling.csv")))
    for row in (one, teacher):
        assert row["matched"] == "True"
        assert float(row["entropy"]) == pytest.approx(target, rel=0.0011)
    assert float(text["entropy"]) == pytest.approx(heldout)  # held-out text stays itself
    assert f"{target:.2f} bits (--entropy" in (tmp_path / "out" / "scaling.md").read_text()
    capsys.readouterr()
    assert scaling.main([*common, "--entropy", "-1"]) == 2
    assert "--entropy is a unigram entropy in bits" in capsys.readouterr().err
    assert scaling.main([*common, "--tolerance", "0"]) == 2
    assert "--tolerance is a fraction" in capsys.readouterr().err


def test_training_seconds_reads_the_last_logged_row_up_to_the_step(tmp_path):
    scaling = load_scaling()
    (tmp_path / "metrics.csv").write_text("step,total,val_total,elapsed_s\n50,6.0,,10.5\n65,,4.4,12.0\n100,5.0,,20.0\n")
    assert scaling.training_seconds(tmp_path, 65) == 12.0
    assert scaling.training_seconds(tmp_path, 99) == 12.0
    assert math.isnan(scaling.training_seconds(tmp_path, 10))  # none logged yet
    assert math.isnan(scaling.training_seconds(tmp_path / "missing", 65))


def test_x0_reaches_a_gaussian_rows_bound_and_samples_and_not_the_ar_row(tmp_path):
    scaling = load_scaling()
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    run, ar = toy_run_dir(tmp_path / "d", corpus=corpus), toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus)
    common = [f"one={run}", "--teacher", str(ar), "--samples", "8", "--windows", "4", "--draws", "1",
              "--speed_steps", "3"]
    tables = {}
    for x0 in ("predicted", "expected"):
        assert scaling.main([*common, "--x0", x0, "--out", str(tmp_path / x0)]) == 0
        tables[x0] = list(csv.DictReader(open(tmp_path / x0 / "scaling.csv")))
    predicted, expected = tables["predicted"][0], tables["expected"][0]
    assert (predicted["x0"], expected["x0"], tables["expected"][1]["x0"]) == ("predicted", "expected", "")
    assert predicted["nll_bound"] != expected["nll_bound"]  # another reverse process, another bound
    assert predicted["argmax_entropy"] != expected["argmax_entropy"]  # and other samples
    assert tables["predicted"][1]["teacher_ppl"] == tables["expected"][1]["teacher_ppl"]  # the AR row unchanged
