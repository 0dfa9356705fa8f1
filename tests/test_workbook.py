"""The workbook without running notebooks: committed notebooks, HTML export, the index, guards."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from dlm.cli import main
from dlm.core.config import ConfigError
from dlm.workbench import workbook
from tests.conftest import ROOT

NOTEBOOKS = [ROOT / "notebooks" / f"{name}.ipynb" for name in workbook.NOTEBOOKS]
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs_and_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the outputs before committing"
    assert "widgets" not in nb.metadata
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert nb.metadata.kernelspec.name == "python3"
    parameters = papermill.inspect_notebook(str(path))
    assert parameters["run_dir"]["inferred_type_name"] == "str"
    for name, info in parameters.items():
        assert info["inferred_type_name"] != "None", f"{name} has no type"
        assert info["help"], f"{name} has no comment"


def test_train_parameters_match_the_config():
    parameters = papermill.inspect_notebook(str(ROOT / "notebooks" / "train.ipynb"))
    assert parameters["params"]["default"] == '"params/default.yaml"'
    assert parameters["epochs"]["inferred_type_name"] == "Optional[int]"
    # every Config key, typed and None by default: tests/test_notebook_parameters.py (none skipped)


@pytest.mark.slow
def test_papermill_help_notebook_lists_typed_parameters():
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(ROOT / "notebooks" / "train.ipynb")],
                         capture_output=True, text=True, check=True).stdout
    assert 'run_dir: str (default "runs/notebook")' in out
    assert "epochs: Optional[int] (default None)" in out and "passes over the training windows" in out
    assert "Unable to parse" not in out


@pytest.mark.parametrize("name", ["sample", "collapse_analysis"])
def test_sample_and_collapse_parameters(name):
    parameters = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))
    assert parameters["num_samples"]["inferred_type_name"] == "int" and int(parameters["num_samples"]["default"]) > 0
    assert parameters["steps"]["default"] == "-1" and "sample_steps" in parameters["steps"]["help"]


def test_external_references():
    bad = ['<script src="https://cdn.example/require.js"></script>', "<link rel=stylesheet href=//cdn.example/x.css>",
           "<style>@import url(https://fonts.example/f.css);</style>", "<img src='http://example.com/x.png'>",
           '<div style="background: url( https://example.com/a.png)">']
    for page in bad:
        assert workbook.external_references(page), page
    good = ['<a href="https://github.com/x">a link</a>', "/* see https://github.com/x */", "<script>var a = 1;</script>",
            '<img src="data:image/png;base64,AAAA">']
    for page in good:
        assert workbook.external_references(page) == [], page


def widget_notebook():
    nb = new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells = [
        new_markdown_cell("# Title\n\n## Loss <curves>"),
        new_code_cell("show()", outputs=[
            new_output("display_data", data={WIDGET: {"model_id": "1"}, "text/plain": "IntSlider()"}),
            new_output("display_data", data={WIDGET: {"model_id": "2"}, "text/html": "<p>offline slider</p>",
                                             "text/plain": "x"}),
            new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}),
            new_output("stream", name="stdout", text="step 1 | loss 0.5\n"),
        ]),
    ]
    return nb


def test_export_html_is_offline_and_hides_code(tmp_path):
    path = tmp_path / "nb.ipynb"
    nbformat.write(widget_notebook(), path)
    page = workbook.export_html(path, title="t <1>")
    text = page.read_text()
    assert workbook.external_references(text) == []
    assert not re.search(r"<script[^>]*\bsrc=", text) and "require.js" not in text and "mathjax" not in text.lower()
    assert WIDGET not in text and "offline slider" in text and "IntSlider()" not in text
    assert 'alt="figure: Loss &lt;curves&gt;"' in text
    assert ">show<" not in text and "step 1 | loss 0.5" in text
    assert "<title>t &lt;1&gt;</title>" in text
    assert ">show<" in workbook.export_html(path, tmp_path / "code.html", show_code=True).read_text()


def test_strip_widgets_keeps_html_fallback():
    nb = workbook.strip_widgets(widget_notebook())
    outputs = nb.cells[1].outputs
    assert "widgets" not in nb.metadata and len(outputs) == 3
    assert set(outputs[0].data) == {"text/html", "text/plain"}


def write_run(folder, collapsed=True):
    (folder / "samples").mkdir(parents=True)
    (folder / "analysis").mkdir()
    (folder / "metrics.csv").write_text(
        "step,epoch,total,mse,rounding,prior,val_total,val_mse,val_rounding,val_prior,embedding_norm,nn_distance,"
        "lr,tokens_per_s,elapsed_s\n"
        "5,1,3.0,1.0,2.0,0.0,,,,,4.0,2.5,0.001,100.0,1.0\n"
        "10,1,,,,,2.5,1.5,1.0,0.0,,,,,2.0\n")
    (folder / "samples" / "summary.json").write_text(json.dumps({
        "samples": {"punctuation_share": 0.8, "unigram_entropy": 2.0, "types": 12, "top10_share": 0.9},
        "heldout": {"punctuation_share": 0.2, "unigram_entropy": 7.0, "types": 300, "top10_share": 0.3}}))
    (folder / "analysis" / "verdict.json").write_text(json.dumps(
        {"collapsed": collapsed, "began_epoch": 1 if collapsed else None, "signals": "punctuation" if collapsed else "",
         "warnings": ""}))


def test_run_numbers_and_index(tmp_path):
    reports = tmp_path / "reports"
    write_run(reports / "good" / "run")
    numbers = workbook.run_numbers(reports / "good" / "run")
    assert numbers["steps"] == 10 and numbers["train_loss"] == 3.0 and numbers["val_loss"] == 2.5
    assert numbers["samples_punctuation_share"] == 0.8 and numbers["heldout_types"] == 300
    assert numbers["collapsed"] is True and numbers["collapse_began_epoch"] == 1
    (reports / "good" / "report.json").write_text(json.dumps({
        "name": "good", "params": "params/x.yaml", "status": "complete", "created": "2026-01-02T00:00:00",
        "pages": {"train": "train.html", "sample": "sample.html"}, "numbers": numbers, "wall_s": 12.0}))
    (reports / "bad").mkdir()
    (reports / "bad" / "report.json").write_text(json.dumps({
        "name": "bad", "params": "<p>.yaml", "status": "failed", "created": "2026-01-03T00:00:00",
        "failure": {"notebook": "sample", "cell": 4, "error": "ValueError: <steps> too large"},
        "pages": {"train": "train.html"}, "numbers": {}}))
    (reports / "stray").mkdir()  # a folder without report.json is not listed
    index = workbook.write_index(reports).read_text()
    assert workbook.external_references(index) == [] and "<script" not in index
    assert index.index(">bad<") < index.index(">good<")  # newest first
    assert '<a href="good/train.html">training</a>' in index and '<a href="good/sample.html">samples</a>' in index
    assert "collapsed since epoch 1 (punctuation)" in index and "0.800 / 0.200" in index
    assert "failed in sample.ipynb cell 4: ValueError: &lt;steps&gt; too large" in index
    assert "&lt;p&gt;.yaml" in index and "stray" not in index


def test_build_report_guards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 1\n")
    with pytest.raises(ConfigError, match="Unknown config key 'epoch'"):
        (tmp_path / "bad.yaml").write_text("epoch: 1\n")
        workbook.build_report(tmp_path / "bad.yaml", reports_dir=tmp_path / "r")
    with pytest.raises(workbook.ReportError, match="names a folder"):
        workbook.build_report(preset, name="../x", reports_dir=tmp_path / "r")
    with pytest.raises(workbook.ReportError, match="Unknown notebook"):
        workbook.build_report(preset, reports_dir=tmp_path / "r", parameters={"trian": {}})
    (tmp_path / "r" / "p").mkdir(parents=True)
    (tmp_path / "r" / "p" / "report.json").write_text("{}")
    with pytest.raises(workbook.ReportExistsError, match="--overwrite"):
        workbook.build_report(preset, reports_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "p" / "run").exists()


def test_report_command_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("epoch: 1\n")
    assert main(["report", "bad.yaml"]) == 2
    assert "Unknown config key 'epoch'" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("epochs: 1\n")
    (tmp_path / "reports" / "mine").mkdir(parents=True)
    (tmp_path / "reports" / "mine" / "x").write_text("")
    assert main(["report", "p.yaml", "--name", "mine"]) == 2
    assert "already holds a report" in capsys.readouterr().err


FIRST_REPORT = """
import sys, time
from pathlib import Path
from dlm.workbench import workbook

def training(notebook, output, parameters, **kwargs):  # the train notebook, still running
    run = Path(parameters["run_dir"]); run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.csv").write_text("step\\n1\\n")
    Path(sys.argv[2]).write_text("started")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    raise SystemExit(0)

workbook.execute = training
workbook.build_report(sys.argv[1], reports_dir="reports")
"""


def test_a_second_report_of_the_same_name_never_deletes_the_first_while_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("epochs: 1\n")
    started, release = tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", FIRST_REPORT, "p.yaml", str(started), str(release)], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first report did not start"
            time.sleep(0.05)
        files = {p: p.read_bytes() for p in (tmp_path / "reports" / "p").rglob("*") if p.is_file()}
        assert main(["report", "p.yaml", "--overwrite"]) != 0
        err = capsys.readouterr().err
        assert "being written right now" in err and "--name" in err and "Traceback" not in err
        assert {p: p.read_bytes() for p in (tmp_path / "reports" / "p").rglob("*") if p.is_file()} == files
    finally:
        release.write_text("")
        first.wait(timeout=60)
    # once the first has finished, --overwrite replaces it as before
    monkeypatch.setattr(workbook, "execute", lambda *args, **kwargs: None)
    monkeypatch.setattr(workbook, "export_html", lambda executed, **kwargs: Path(executed).with_suffix(".html"))
    workbook.build_report(tmp_path / "p.yaml", reports_dir=tmp_path / "reports", overwrite=True)
    assert not (tmp_path / "reports" / "p" / "run" / "metrics.csv").exists()


@pytest.mark.slow
def test_python_m_dlm_report_is_the_report_command():
    done = subprocess.run([sys.executable, "-m", "dlm", "report", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "usage: dlm report" in done.stdout and "--name" in done.stdout


def test_path_for_kernel(tmp_path):
    assert workbook.path_for_kernel(ROOT / "reports" / "x" / "run", ROOT) == "reports/x/run"
    assert workbook.path_for_kernel(tmp_path / "run", ROOT) == str(tmp_path.resolve() / "run")
    assert workbook.path_for_kernel(tmp_path / "run", tmp_path) == str(tmp_path.resolve() / "run")


def test_a_kernel_that_cannot_run_is_reported(tmp_path, monkeypatch):
    def dead_kernel(*args, **kwargs):
        raise RuntimeError("Kernel died before replying to kernel_info")

    monkeypatch.setattr(workbook, "execute", dead_kernel)
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 1\n")
    with pytest.raises(workbook.ReportError, match="train.ipynb could not run: RuntimeError: Kernel died"):
        workbook.build_report(preset, reports_dir=tmp_path / "r")
    info = json.loads((tmp_path / "r" / "p" / "report.json").read_text())
    assert info["status"] == "failed" and info["failure"]["notebook"] == "train"
    assert "failed in train.ipynb" in (tmp_path / "r" / "index.html").read_text()


def test_long_printed_output_is_folded_on_the_page(tmp_path):
    log = "".join(f"step {i:4d} | loss {1 / i:.3f}\n" for i in range(1, 41))
    nb = new_notebook(cells=[new_markdown_cell("# Train"),
                             new_code_cell("train()", outputs=[new_output("stream", name="stdout", text=line)
                                                               for line in log.splitlines(keepends=True)]),
                             new_code_cell("print(1)", outputs=[new_output("stream", name="stdout", text="short\n")])])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "t.ipynb")
    page = workbook.export_html(tmp_path / "t.ipynb").read_text()
    assert "<details" in page and "log: 40 lines (last: step   40 | loss 0.025)" in page
    assert "step   40" in page and "short" in page
    assert page.index("<summary>") < page.index("step    1 |")  # the log itself sits inside the fold


def test_echo_indents_kernel_output_line_by_line():
    import io

    out = io.StringIO()
    echo = workbook.Echo(out, prefix="> ")
    echo.write("step 1 | loss 2.0\nstep 2")
    echo.write(" | loss 1.5\n")
    assert out.getvalue() == "> step 1 | loss 2.0\n> step 2 | loss 1.5\n"


def test_index_leads_with_the_verdict_and_notebook_times(tmp_path):
    reports = tmp_path / "reports"
    (reports / "r").mkdir(parents=True)
    (reports / "r" / "report.json").write_text(json.dumps({
        "status": "complete", "created": "2026-01-01T00:00:00", "params": "p.yaml", "wall_s": 90.0,
        "notebook_s": {"train": 60.0, "sample": 20.0, "collapse_analysis": 10.0},
        "pages": {"train": "train.html"}, "numbers": {"collapsed": False}}))
    index = workbook.write_index(reports).read_text()
    row = index.split("<tr>")[2]
    assert row.index("not collapsed") < row.index("complete")  # the verdict right after the name
    assert "60 / 20 / 10" in row


def test_training_time_comes_from_the_run_not_the_resuming_clock(smoke_config, tmp_path):
    from dlm.runs.train import train

    run = tmp_path / "run"
    first = train(smoke_config.replace(epochs=1, precision="fp32"), run)
    second = train(smoke_config.replace(epochs=2, precision="fp32"), run, resume=True)
    resumed = workbook.trained_line(second, run)  # said of the invocation that trained the second epoch
    assert f"resumed at step {first.step}, trained to {second.step} steps" in resumed
    nothing = train(smoke_config.replace(epochs=2, precision="fp32"), run, resume=True)  # a finished run, resumed
    assert nothing.step == second.step and nothing.wall_s < 1.0
    # each invocation's clock starts at zero: the run's time is the two invocations' last times, added
    metrics = pd.read_csv(run / "metrics.csv")
    expected = (metrics.loc[metrics["step"] <= first.step, "elapsed_s"].max()
                + metrics.loc[metrics["step"] > first.step, "elapsed_s"].max())
    assert expected > metrics["elapsed_s"].max()  # the second invocation's clock did start again
    assert workbook.run_numbers(run)["train_s"] == pytest.approx(expected)
    line = workbook.trained_line(nothing, run)
    assert f"in {expected:.1f}s of training" in line and "already trained" in line and f"{second.step} steps" in line
    assert f"{nothing.wall_s:.1f}s" not in line
    fresh = workbook.trained_line(first, tmp_path / "elsewhere")  # no metrics: no made-up time
    assert "unrecorded time" in fresh



def test_page_leads_with_results_and_folds_the_introduction_and_log_below(tmp_path):
    intro = new_markdown_cell("# Train a run\n\nWhat it does.\n\n```bash\npapermill notebooks/train.ipynb out.ipynb\n```")
    intro.metadata["tags"] = [workbook.INTRO_TAG]
    heading = new_markdown_cell("## Training")
    heading.metadata["tags"] = [workbook.BELOW_TAG]
    log = new_code_cell("train()", outputs=[new_output("stream", name="stdout", text="step 1 | loss 0.5\n")])
    log.metadata["tags"] = [workbook.BELOW_TAG]
    nb = new_notebook(cells=[intro, new_code_cell("epochs = 1"), heading, log, new_markdown_cell("## Result"),
                             new_code_cell("plot()", outputs=[new_output("display_data", data={
                                 "image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})])])
    nbformat.write(nb, tmp_path / "nb.ipynb")
    page = workbook.export_html(tmp_path / "nb.ipynb").read_text()
    body = page[page.index("<main>"):]
    order = [body.index(text) for text in ("Train a run", "Result", "<img", "Training", "step 1 | loss 0.5",
                                           '<details class="dlm-about">', "What it does.", "notebooks/train.ipynb")]
    assert order == sorted(order)  # title, results, then the training log, then the folded introduction
    assert body.count("notebooks/train.ipynb") == 1 and "<pre" in body[order[-3]:]  # the command kept, folded
    assert body.count("jp-Cell jp-CodeCell") == 3  # the parameters cell printed nothing: no empty gap on the page
    shown = workbook.export_html(tmp_path / "nb.ipynb", tmp_path / "code.html", show_code=True).read_text()
    assert shown[shown.index("<main>"):].count("jp-Cell jp-CodeCell") == 4  # with its code shown, every cell stays


def test_train_tells_a_listener_of_every_metrics_row(smoke_config, tmp_path):
    from dlm.runs.train import train

    heard = []
    train(smoke_config.replace(epochs=1, precision="fp32"), tmp_path / "run", on_metrics=heard.append)
    written = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(heard) == len(written) >= 2 and [row["step"] for row in heard] == written["step"].tolist()
    assert any("val_total" in row for row in heard) and any("total" in row for row in heard)


def pages_run(tmp_path, monkeypatch, preset_text: str, parameters: dict) -> dict[str, dict]:
    """The notebooks build_report runs (name -> the parameters it gives), no kernel started."""
    ran = {}

    def record(notebook, output, parameters, **kwargs):
        ran[Path(notebook).stem] = parameters

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workbook, "execute", record)
    monkeypatch.setattr(workbook, "export_html", lambda executed, **kwargs: Path(executed).with_suffix(".html"))
    (tmp_path / "p.yaml").write_text(preset_text)
    workbook.build_report(tmp_path / "p.yaml", reports_dir=tmp_path / "r", parameters=parameters, overwrite=True)
    return ran


def test_the_control_page_follows_the_train_parameters_over_the_preset(tmp_path, monkeypatch):
    plain = pages_run(tmp_path, monkeypatch, "epochs: 1\n", {})
    assert list(plain) == ["train", "sample", "collapse_analysis"]
    given = pages_run(tmp_path, monkeypatch, "epochs: 1\n", {"train": {"control_tasks": "infill,prefix"}})
    assert list(given) == ["train", "sample", "collapse_analysis", "control"]
    assert given["control"]["task"] == "infill,prefix" and given["train"]["control_tasks"] == "infill,prefix"
    # and the other way: a preset's control tasks turned off for one report
    assert "control" not in pages_run(tmp_path, monkeypatch, "control_tasks: infill\n", {"train": {"control_tasks": ""}})
    # a family given over the preset decides which pages its family has (no collapse page for a masked run)
    masked = pages_run(tmp_path, monkeypatch, "epochs: 1\n", {"train": {"model": "masked"}})
    assert list(masked) == ["train", "sample"]


@pytest.mark.parametrize("notebook, key, value, flag", [
    ("sample", "clamp", True, "--param sample.clamp is an option of the Gaussian diffusion chain; the 'ar' family"),
    ("sample", "steps", 10, "--param sample.steps is an option of the diffusion and masked families' samplers"),
    ("sample", "curve_steps", "10,20", "--param sample.curve_steps is an option of the diffusion and masked"),
    ("sample", "spacing", "uniform", "--param sample.spacing is an option of the Gaussian diffusion chain"),
    ("control", "steps", 10, "--param control.steps is an option of the diffusion and masked families'"),
    ("train", "preview_steps", 10, "--param train.preview_steps is an option of the diffusion and masked"),
])
def test_a_sampler_option_the_family_does_not_read_is_refused_before_the_report(tmp_path, monkeypatch, capsys,
                                                                                notebook, key, value, flag):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workbook, "execute", lambda *args, **kwargs: pytest.fail("a notebook ran"))
    (tmp_path / "ar.yaml").write_text("model: ar\ncontrol_tasks: prefix\n")
    assert main(["report", "ar.yaml", "--param", f"{notebook}.{key}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlm report: error: ") and flag in err[0], err
    assert not (tmp_path / "reports").exists()


def test_sampler_parameters_left_to_the_run_build_an_ar_report(tmp_path, monkeypatch):
    defaults = {"sample": {"steps": -1, "curve_steps": "", "clamp": None, "spacing": "", "record_every": 0,
                           "num_samples": 4, "seed": 1},
                "control": {"steps": -1}, "train": {"preview_steps": -1}}
    ran = pages_run(tmp_path, monkeypatch, "model: ar\ncontrol_tasks: prefix\n", defaults)
    assert list(ran) == ["train", "sample", "control"]  # no collapse page for the AR family
