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
