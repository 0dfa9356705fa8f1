import logging

import pytest

from dlm.core.config import ConfigError
from dlm.workbench import notebook
from tests.conftest import ROOT


def test_project_root_from_inside_and_outside(tmp_path):
    assert notebook.project_root(ROOT / "notebooks") == ROOT
    assert notebook.project_root(ROOT) == ROOT
    assert notebook.project_root(tmp_path) is None


def test_resolve_path_is_the_same_from_root_and_notebooks(tmp_path):
    assert notebook.resolve_path("runs/x", ROOT) == ROOT / "runs" / "x"
    assert notebook.resolve_path("runs/x", ROOT / "notebooks") == ROOT / "runs" / "x"
    assert notebook.resolve_path("runs/x", tmp_path) == tmp_path.resolve() / "runs" / "x"
    assert notebook.resolve_path(tmp_path / "abs", ROOT) == tmp_path / "abs"


def test_resolved_paths_are_relative_under_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert notebook.resolve_path("runs/x") == notebook.Path("runs/x")
    assert notebook.resolve_input("params/smoke.yaml") == notebook.Path("params/smoke.yaml")
    assert notebook.resolve_input(ROOT / "params") == ROOT / "params"  # absolute stays absolute
    monkeypatch.chdir(ROOT / "notebooks")  # JupyterLab's working directory
    assert notebook.resolve_path("runs/x") == ROOT / "runs" / "x"
    assert notebook.resolve_input("params/smoke.yaml") == ROOT / "params" / "smoke.yaml"


def test_resolve_input_tries_cwd_then_the_project(tmp_path):
    assert notebook.resolve_input("params/smoke.yaml", ROOT / "notebooks") == ROOT / "params" / "smoke.yaml"
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "smoke.yaml").write_text("epochs: 1\n")
    assert notebook.resolve_input("params/smoke.yaml", tmp_path) == tmp_path.resolve() / "params" / "smoke.yaml"
    with pytest.raises(FileNotFoundError, match="nothing.yaml' was not found"):
        notebook.resolve_input("params/nothing.yaml", tmp_path)


def test_notebook_config_precedence(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 7\nembed_dim: 24\nlr: 0.01\n")
    namespace = {"epochs": 2, "lr": None, "run_dir": "x", "params": str(preset), "batch_size": 4}
    config = notebook.notebook_config(preset, namespace, progress=False)
    assert config.epochs == 2 and config.embed_dim == 24 and config.lr == 0.01  # None keeps the preset's
    assert config.batch_size == 4 and config.progress is False
    assert notebook.notebook_config("", {}).epochs == 10  # no preset: the Config defaults
    with pytest.raises(ConfigError, match="'epochs' got 'three'"):
        notebook.notebook_config(preset, {"epochs": "three"})


def test_config_overrides_only_take_config_keys():
    assert notebook.config_overrides({"epochs": 3, "seed": None, "pd": object(), "run_dir": "r"}) == {"epochs": 3}


def test_split_list_and_short_names(tmp_path):
    assert notebook.split_list("a, b,,c ") == ["a", "b", "c"]
    assert notebook.split_list(["a", ""]) == ["a"] and notebook.split_list(None) == []
    assert notebook.short_names([tmp_path / "reports" / "smoke" / "run"]) == ["smoke/run"]


@pytest.fixture
def restore_dlm_logger():
    logger = logging.getLogger("dlm")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_setup_logs_dlm_lines_to_stdout(capsys, restore_dlm_logger):
    notebook.setup()
    notebook.setup()  # idempotent: one handler
    logging.getLogger("dlm").info("step 1 | loss 0.5")
    assert capsys.readouterr().out.count("step 1 | loss 0.5") == 1


def test_step_counts_keep_what_the_run_can_take_and_name_bad_entries():
    assert notebook.step_counts("50, 10,2000,10", total_steps=1000) == [10, 50]
    assert notebook.step_counts("", total_steps=100) == []
    with pytest.raises(ValueError, match="curve_steps.*'ten'"):
        notebook.step_counts("10,ten", total_steps=100)
    with pytest.raises(ValueError, match="positive"):
        notebook.step_counts("0", total_steps=100)
    with pytest.raises(ValueError, match="exceeds"):
        notebook.step_counts("500", total_steps=100)


def test_unknown_parameter_is_rejected_with_a_suggestion():
    declared = notebook.assigned_names('run_dir: str = "runs/x"  # a folder\nepochs: Optional[int] = None\nx = 1\n')
    assert declared == ["run_dir", "epochs", "x"]
    notebook.unknown_parameters(declared, ["epochs", "run_dir"])  # all known: no error
    notebook.unknown_parameters(declared, ["lr"], also_allowed={"lr"})
    with pytest.raises(ValueError, match=r"Unknown parameter 'epoch' for train.ipynb. Did you mean 'epochs'\?") as caught:
        notebook.unknown_parameters(declared, ["epoch"], notebook="train.ipynb")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("threads", [-2, 1.5, True])
def test_notebook_setup_refuses_a_bad_thread_count_in_one_line(threads):
    with pytest.raises(ConfigError, match="threads must be a number of threads"):
        notebook.setup(threads=threads)


def test_the_train_page_shows_the_run_s_own_config_and_names_what_it_did_not_apply(tmp_path):
    """A report drawn --from_run a masked run with --param train.mask_rate_min=0.5 resumes it; the run
    keeps its mask_rate_min (0.001, what it was trained with) and applies the new max_steps: the page's
    table holds the run's values and the one line names mask_rate_min alone."""
    from dlm.core.config import load_config
    from dlm.runs.train import train
    from tests.conftest import make_corpus

    preset = ROOT / "params" / "masked_smoke.yaml"
    quick = dict(corpus=str(make_corpus(tmp_path / "corpus.txt")), min_count=1, max_train_tokens=None,
                 precision="fp32", device="cpu", threads=1, progress=False)
    train(load_config(preset, max_steps=2, **quick), tmp_path / "run")
    asked = load_config(preset, max_steps=3, mask_rate_min=0.5, **quick)
    train(asked, tmp_path / "run", resume=True)  # what train.ipynb does with a --from_run
    run_config = notebook.trained_config(tmp_path / "run")
    assert (run_config.mask_rate_min, run_config.max_steps) == (0.001, 3)
    table, line = notebook.configuration_table(run_config, asked)
    assert table.loc["mask_rate_min", "value"] == 0.001 and table.loc["max_steps", "value"] == 3
    assert table.loc["mask_rate_min", "asked, not applied"] == "0.5" and table.loc["lr", "asked, not applied"] == ""
    assert "asked for but not applied" in line and "mask_rate_min 0.5 (the run's: 0.001)" in line
    assert "max_steps" not in line and line.count("(the run's:") == 1
    assert notebook.configuration_table(run_config, run_config)[1] is None  # a run trained as asked: no line
    assert list(notebook.configuration_table(run_config, run_config)[0].columns) == ["value"]
