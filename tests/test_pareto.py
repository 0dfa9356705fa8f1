"""Quality against sampling cost (issue 35): the settings a row takes, the Pareto frontier and the
race against the AR model on tables made by hand, the figure, the index section, and
benchmarks/pareto.py end to end on untrained toy runs."""

import csv
import importlib.util

import pandas as pd
import pytest

from dlm.core.errors import UserError
from dlm.evaluation.speed_quality import Setting, frontier, parse_settings, race
from tests.conftest import ROOT, make_corpus, toy_run_dir


def test_settings_read_sampler_steps_and_both():
    assert parse_settings("grid:10, first_hitting,confidence:4,50") == [
        Setting("grid", 10), Setting("first_hitting", None), Setting("confidence", 4), Setting(None, 50)]
    assert parse_settings("") == [Setting()]
    assert [s.label() for s in parse_settings("grid:10,first_hitting,7")] == ["grid:10", "first_hitting", "7"]
    assert Setting().label() == "its own"


@pytest.mark.parametrize("text", ["grid:ten", "grid:0", "0", "grid:-2"])
def test_a_setting_that_is_not_one_is_one_line(text):
    with pytest.raises(UserError, match="SAMPLER:STEPS"):
        parse_settings(text)


def test_frontier_keeps_the_rows_nothing_beats_on_both():
    table = pd.DataFrame({"cost": [1.0, 2.0, 3.0, 2.5, 1.0, None],
                          "teacher_ppl": [100.0, 50.0, 40.0, 60.0, 120.0, 10.0]})
    # row 3 is beaten by row 1 (cheaper and better); row 4 by row 0 (as cheap, better); row 5 is unmeasured
    assert frontier(table, "cost").tolist() == [True, True, True, False, False, False]


def test_equal_rows_both_stay_on_the_frontier():
    table = pd.DataFrame({"cost": [1.0, 1.0], "teacher_ppl": [5.0, 5.0]})
    assert frontier(table, "cost").tolist() == [True, True]


def race_table():
    return pd.DataFrame({
        "row": ["ar", "fast good", "fast bad", "slow good", "good alone only"],
        "teacher_ppl": [30.0, 60.0, 90.0, 33.0, 70.0], "ppl_max": [34.0, 61.0, 95.0, 34.0, 71.0],
        "cpu_s_per_sample": [0.05, 0.03, 0.01, 0.20, 0.06], "batch1_s": [0.30, 0.20, 0.10, 0.90, 0.25]})


def test_race_asks_quality_within_the_ar_spread_or_heldout_at_no_more_cost():
    table = race(race_table(), "ar", heldout_ppl=70.0)
    by_row = table.set_index("row")
    # held-out's 70 is above the AR's highest seed (34): the bar is 70
    assert by_row["quality_ok"].tolist()[1:] == [True, False, True, True]
    assert by_row["batch64_ok"].tolist()[1:] == [True, False, False, False]
    assert by_row["batch1_ok"].tolist()[1:] == [True, False, False, True]
    assert pd.isna(by_row.loc["ar", "quality_ok"])  # the AR does not race itself


def test_race_bar_is_the_ar_spread_when_heldout_is_lower():
    table = race(race_table(), "ar", heldout_ppl=20.0).set_index("row")
    assert table["quality_ok"].tolist()[1:] == [False, False, True, False]  # only 33 <= the AR's 34


def test_race_without_its_ar_row_is_one_line():
    with pytest.raises(UserError, match="no row 'AR'"):
        race(race_table(), "AR", heldout_ppl=70.0)


def pareto_csv_table():
    table = race(race_table(), "ar", heldout_ppl=70.0)
    table["family"] = ["autoregressive", "masked diffusion", "masked diffusion", "Gaussian diffusion", "masked diffusion"]
    table["setting"] = ["its own", "grid:1", "grid:10", "its own", "first_hitting"]
    table["ppl_min"], table["entropy"], table["heldout_ppl"] = table["teacher_ppl"] - 1, 7.7, 70.0
    for cost in ("cpu_s_per_sample", "batch1_s"):
        table[f"frontier_{cost}"] = frontier(table, cost)
    return table


def test_the_figure_has_both_costs_and_joins_each_frontier():
    from dlm.workbench import plots

    figure = plots.quality_against_speed(pareto_csv_table(), heldout_perplexity=70.0)
    assert len(figure.axes) == 2
    for ax in figure.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        frontier_lines = [line for line in ax.get_lines() if line.get_label().startswith("the frontier")]
        assert len(frontier_lines) == 1
    # batch 64: fast bad (0.01), fast good (0.03) and the AR (0.05); slow good (0.2, 33) is beaten by the AR
    front = [line for line in figure.axes[0].get_lines() if line.get_label().startswith("the frontier")][0]
    assert sorted(front.get_xdata()) == [0.01, 0.03, 0.05]


def test_labels_of_settings_that_cost_the_same_do_not_overlap():
    """Two settings at one cost and nearly one quality (grid:1 and confidence:1 were): their labels
    are moved apart, and the family names are in the legend, not in every label."""
    from dlm.workbench import plots

    table = pareto_csv_table()
    table.loc[4, ["cpu_s_per_sample", "batch1_s", "teacher_ppl", "ppl_min", "ppl_max"]] = \
        table.loc[1, ["cpu_s_per_sample", "batch1_s", "teacher_ppl", "ppl_min", "ppl_max"]].to_numpy() * [1, 1, 1.02, 1.02, 1.02]
    figure = plots.quality_against_speed(table, heldout_perplexity=70.0)
    figure.draw_without_rendering()
    for ax in figure.axes:
        boxes = [text.get_window_extent() for text in ax.texts]
        assert len(boxes) == len(table)
        assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert {text.get_text() for text in figure.legends[0].texts} >= {"autoregressive", "masked diffusion"}


def test_the_index_shows_quality_against_cost_only_with_a_table(tmp_path):
    from dlm.workbench.workbook import write_index

    page = write_index(tmp_path).read_text()
    assert "Sample quality against sampling cost" not in page
    pareto_csv_table().to_csv(tmp_path / "pareto.csv", index=False)
    page = write_index(tmp_path).read_text()
    assert "Sample quality against sampling cost" in page
    assert "<b>fast good</b>" in page and "<b>fast bad</b>" in page  # on a frontier: bold
    assert "<b>slow good</b>" not in page and "<b>good alone only</b>" not in page and "slow good" in page
    assert "data:image/png;base64," in page
    (tmp_path / "pareto.csv").write_text("not,a\ntable")  # one that does not read: no section, no crash
    assert "Sample quality against sampling cost" not in write_index(tmp_path).read_text()


def load_pareto():
    spec = importlib.util.spec_from_file_location("pareto", ROOT / "benchmarks" / "pareto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pareto_rows_per_setting_beside_the_ar(tmp_path, capsys):
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    masked = toy_run_dir(tmp_path / "m", model="masked", corpus=corpus)
    gaussian = toy_run_dir(tmp_path / "g", corpus=corpus)
    ar = toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus)
    (tmp_path / "reports").mkdir()
    assert load_pareto().main([f"m={masked}::grid:2,first_hitting", f"g={gaussian}", "--teacher", str(ar),
                               "--samples", "8", "--seeds", "2", "--latency_repeats", "1",
                               "--out", str(tmp_path / "out"), "--index", str(tmp_path / "reports")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "pareto.csv")))
    assert [(r["row"], r["setting"]) for r in rows] == [
        ("AR, KV-cached (the teacher, self-scored)", "its own"), ("m", "grid:2"), ("m", "first_hitting"),
        ("g", "its own")]
    for row in rows:
        assert row["matched"] == "True"
        assert float(row["ppl_min"]) <= float(row["teacher_ppl"]) <= float(row["ppl_max"])
        assert float(row["cpu_s_per_sample"]) > 0 and float(row["batch1_s"]) > 0
    assert rows[0]["quality_ok"] == "" and rows[1]["quality_ok"] in ("True", "False")
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    assert "Sample quality against sampling cost" in (tmp_path / "reports" / "index.html").read_text()
    assert not (tmp_path / "out" / "pareto.partial.csv").exists()


def test_keep_adds_rows_to_an_earlier_table_without_measuring_it_again(tmp_path, capsys):
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    masked = toy_run_dir(tmp_path / "m", model="masked", corpus=corpus)
    ar = toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus)
    earlier = pareto_csv_table().drop(columns=["frontier_cpu_s_per_sample"])
    earlier.loc[0, "row"] = load_pareto().AR_ROW
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    assert load_pareto().main([f"m={masked}::grid:2", f"fast bad={masked}::grid:10", "--teacher", str(ar),
                               "--samples", "4", "--seeds", "1", "--latency_repeats", "1",
                               "--out", str(tmp_path / "out"), "--keep", str(tmp_path / "earlier.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "pareto.csv")))
    assert [(r["row"], r["setting"]) for r in rows] == [
        (load_pareto().AR_ROW, "its own"), ("fast good", "grid:1"), ("slow good", "its own"),
        ("good alone only", "first_hitting"), ("m", "grid:2"), ("fast bad", "grid:10")]
    # the AR and the kept rows are the earlier table's numbers; "fast bad" (grid:10) was measured again
    assert float(rows[0]["cpu_s_per_sample"]) == float(earlier.loc[0, "cpu_s_per_sample"])
    assert float(rows[5]["cpu_s_per_sample"]) != float(earlier.loc[2, "cpu_s_per_sample"]) and rows[5]["measured"]
    assert rows[4]["quality_ok"] in ("True", "False") and "--keep" in (tmp_path / "out" / "pareto.md").read_text()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert load_pareto().main([f"m={masked}", "--teacher", str(ar), "--out", str(tmp_path / "out2"),
                               "--keep", str(tmp_path / "bad.csv")]) == 2
    assert "--keep" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_a_sampler_on_a_family_without_one_is_refused_before_sampling(tmp_path, capsys):
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    gaussian = toy_run_dir(tmp_path / "g", corpus=corpus)
    ar = toy_run_dir(tmp_path / "ar", model="ar", corpus=corpus)
    assert load_pareto().main([f"g={gaussian}::grid:2", "--teacher", str(ar), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "row 'g' (grid:2)" in err and "masked" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
