"""benchmarks/spacing.py at tiny sizes: a row per step count, spacing and seed, each scored."""

import importlib.util

import pandas as pd
import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_spacing_table_has_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("spacing", ROOT / "benchmarks" / "spacing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "spacing.csv")
    assert len(table) == 2 * 2 * 2  # steps 3 and 5, two spacings, two seeds
    assert set(table["spacing"]) == {"logsnr", "logsnr_full"}
    assert (table["teacher_perplexity"] > 0).all() and (table["chain_bound"] > 0).all()
    assert "python benchmarks/spacing.py --quick" in (tmp_path / "spacing.md").read_text()
    # --x0 and --entropy reach the chain and the scoring: another reverse process, another target
    other = tmp_path / "expected"
    assert module.main(["--quick", "--out", str(other), "--x0", "expected", "--entropy", "3.5", "--seeds", "0"]) == 0
    expected = pd.read_csv(other / "spacing.csv")
    assert set(expected["x0"]) == {"expected"} and set(table["x0"]) == {"predicted"}
    assert (expected["target_entropy"] == 3.5).all() and (table["target_entropy"] != 3.5).all()
    merged = table[table.seed == 0].merge(expected, on=["steps", "spacing"], suffixes=("", "_expected"))
    assert len(merged) == 4 and (merged["chain_bound"] != merged["chain_bound_expected"]).all()
