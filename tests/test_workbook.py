"""The workbook without running notebooks: committed notebooks, HTML export, the index, guards."""

import html
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
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from dlm.cli import main
from dlm.core.config import ConfigError
from dlm.workbench import workbook
from tests.conftest import ROOT, option_readers

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
    assert "collapsed since epoch 1 (punctuation)" in index
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
    (tmp_path / "r" / "p" / "report.json").write_text('{"name": "p", "params": "p.yaml", "status": "failed", "pages": {}}')
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
    assert "is not a report (no report.json of dlm report; it holds x)" in capsys.readouterr().err


def tree(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fake_notebooks(monkeypatch):
    """build_report without kernels: each notebook 'runs' instantly and leaves its page."""
    monkeypatch.setattr(workbook, "execute", lambda *args, **kwargs: None)
    monkeypatch.setattr(workbook, "export_html", lambda executed, **kwargs: Path(executed).with_suffix(".html"))


def a_run(folder: Path) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"weights")
    (folder / "config.yaml").write_text("epochs: 1\n")
    (folder / "metrics.csv").write_text("step,epoch,total,val_total,embedding_norm,nn_distance,elapsed_s\n"
                                        "1,1,2.5,2.6,1.0,0.5,3.0\n")
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_report_never_deletes_a_folder_that_is_not_a_report(tmp_path, monkeypatch, capsys, overwrite):
    """`dlm report --reports_dir runs --overwrite` after training into runs/p: the run survives."""
    monkeypatch.chdir(tmp_path)
    fake_notebooks(monkeypatch)
    (tmp_path / "p.yaml").write_text("epochs: 1\n")
    a_run(tmp_path / "runs" / "p")
    before = tree(tmp_path / "runs")
    assert main(["report", "p.yaml", "--reports_dir", "runs", *(["--overwrite"] if overwrite else [])]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not a report" in err and "checkpoints/, config.yaml, metrics.csv" in err
    assert "already holds a report" not in err
    assert tree(tmp_path / "runs") == before


def test_report_overwrite_refuses_a_from_run_inside_the_report_it_would_delete(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fake_notebooks(monkeypatch)
    (tmp_path / "p.yaml").write_text("epochs: 1\n")
    workbook.build_report(tmp_path / "p.yaml", name="bt", reports_dir=tmp_path / "reports")
    a_run(tmp_path / "reports" / "bt" / "run")  # what a failed report leaves: its run, trained
    before = tree(tmp_path / "reports")
    assert main(["report", "p.yaml", "--name", "bt", "--overwrite", "--from_run", "reports/bt/run"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lies inside 'reports/bt', which --overwrite deletes first" in err
    assert tree(tmp_path / "reports") == before
    # the way out the message gives works: the run moved out, then copied into the new report
    (tmp_path / "runs").mkdir()
    (tmp_path / "reports" / "bt" / "run").rename(tmp_path / "runs" / "bt")
    workbook.build_report(tmp_path / "p.yaml", name="bt", reports_dir=tmp_path / "reports", overwrite=True,
                          from_run=tmp_path / "runs" / "bt")
    assert (tmp_path / "reports" / "bt" / "run" / "checkpoints" / "last.pt").read_bytes() == b"weights"
    assert (tmp_path / "runs" / "bt" / "checkpoints" / "last.pt").is_file()


def test_report_is_never_written_inside_its_own_from_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fake_notebooks(monkeypatch)
    (tmp_path / "p.yaml").write_text("epochs: 1\n")
    run = a_run(tmp_path / "runs" / "r")
    before = tree(tmp_path / "runs")
    assert main(["report", "p.yaml", "--from_run", "runs/r", "--reports_dir", "runs/r/reports"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lies inside --from_run 'runs/r'" in err
    assert tree(tmp_path / "runs") == before and not (run / "reports").exists()


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
    ("sample", "clamp", True, "--param sample.clamp is an option of the gaussian family's sampler; the 'ar' family"),
    ("sample", "steps", 10, f"--param sample.steps is an option of {option_readers('steps')}"),
    ("sample", "curve_steps", "10,20", f"--param sample.curve_steps is an option of {option_readers('steps')}"),
    ("sample", "spacing", "uniform", "--param sample.spacing is an option of the gaussian family's sampler"),
    ("sample", "sampler", "confidence", "--param sample.sampler is an option of the masked family's sampler; the 'ar' "
                                        "family"),
    ("control", "steps", 10, f"--param control.steps is an option of {option_readers('steps')}"),
    ("control", "sampler", "first_hitting", "--param control.sampler is an option of the masked family's sampler; the "
                                            "'ar' family"),
    ("train", "preview_steps", 10, f"--param train.preview_steps is an option of {option_readers('steps')}"),
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
                           "sampler": "", "num_samples": 4, "seed": 1},
                "control": {"steps": -1, "sampler": ""}, "train": {"preview_steps": -1}}
    ran = pages_run(tmp_path, monkeypatch, "model: ar\ncontrol_tasks: prefix\n", defaults)
    assert list(ran) == ["train", "sample", "control"]  # no collapse page for the AR family


# --- the index as the families' comparison: fake report folders, as dlm report leaves them --------

VOCAB = ["<pad>", "<unk>", "\n", ",", "."] + [f"w{i}" for i in range(95)]  # 100 tokens: ln V = 4.61


def executed_notebook(path, declared: str, injected: str = "") -> None:
    """An executed notebook's parameters cell and papermill's injected cell after it."""
    cells = [new_code_cell(declared, metadata={"tags": ["parameters"]})]
    if injected:
        cells.append(new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    nbformat.write(new_notebook(cells=cells), path)


def fake_report(reports, name, config: dict, *, created="2026-01-01T00:00:00", elapsed=866.4, bound=None,
                teacher="runs/ar", perplexity=150.0, entropy=7.80, curve_samples=64, seconds=32.0,
                verdict=None, status="complete", not_available=None, recorded=None, pages=("train", "sample")):
    """reports/NAME/ with report.json and a run folder holding what the notebooks write: 910 steps
    trained in `elapsed` seconds of metrics.csv, the bound of train.ipynb (64 windows x 2 draws), a
    quality curve at the samples' 10 steps (teacher perplexity 75.0 of held-out text at 7.77 bits)."""
    folder, run = reports / name, reports / name / "run"
    for sub in ("samples", "analysis"):
        (run / sub).mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"corpus": "c.txt", "sample_steps": 10, **config}))
    (run / "vocab.json").write_text(json.dumps({"kind": "word", "lowercase": False, "itos": VOCAB}))
    (run / "metrics.csv").write_text(
        "step,epoch,total,val_total,embedding_norm,nn_distance,elapsed_s\n"
        f"500,7,5.0,,1.0,1.0,{elapsed / 2}\n910,14,4.6,4.3,1.0,1.0,{elapsed}\n")
    if bound is not None:
        (run / "analysis" / "nll_bound.csv").write_text(f"epoch,step,nll_bound,nll_bound_se\n14,910,{bound},0.24\n")
    if verdict is not None:
        (run / "analysis" / "verdict.json").write_text(json.dumps(
            {"collapsed": verdict, "began_epoch": 2 if verdict else None, "signals": "punctuation" if verdict else "",
             "warnings": ""}))
    (run / "samples" / "summary.json").write_text(json.dumps({"options": {"steps": 10, "temperature": 1.0}}))
    (run / "samples" / "quality_vs_steps.csv").write_text(
        "steps,seconds,teacher_perplexity,unigram_entropy\n"
        f"5,{seconds / 2},{perplexity * 2 if perplexity else ''},8.5\n10,{seconds},{perplexity or ''},{entropy}\n"
        f",,{75.0 if perplexity else ''},7.77\n")
    executed_notebook(folder / "train.ipynb", "nll_windows = 16\nnll_draws = 2", "nll_windows = 64")
    executed_notebook(folder / "sample.ipynb", 'teacher_dir: str = ""\ncurve_samples = 16',
                      f"teacher_dir = {teacher!r}\ncurve_samples = {curve_samples}")
    (folder / "report.json").write_text(json.dumps({
        "name": name, "params": f"params/{name}.yaml", "status": status, "created": created,
        "pages": {page: f"{page}.html" for page in pages}, "notebook_s": {"train": 14.6, "sample": 72.0},
        "wall_s": 103.9, "not_available": not_available or {},
        "numbers": recorded if recorded is not None else workbook.run_numbers(run)}))
    return folder


def index_rows(index: str) -> dict[str, str]:
    """Each table row's HTML by the name in its first cell."""
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", index, re.S)
    return {re.search(r"<b>(.*?)</b>", row).group(1): row for row in rows[1:]}


def cells(row: str) -> list[str]:
    """A row's cells as text: markup out, entities read (a reader sees 'masked', not &#x27;masked&#x27;)."""
    return [html.unescape(re.sub(r"<[^>]+>", " ", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


MASKED_BLOCKS = {"model": "masked", "positions": "rotary", "block_size": 4, "block_training": "all",
                 "mask_rate_min": 0.3, "mask_rate_max": 0.8}
GAUSSIAN = {"model": "gaussian", "embed_dim": 32, "embedding_norm": "l2", "sample_x0": "predicted"}


@pytest.fixture
def three_families(tmp_path):
    reports = tmp_path / "reports"
    fake_report(reports, "masked_b4", MASKED_BLOCKS, created="2026-01-03T00:00:00", bound=4.5, teacher="",
                perplexity=None, not_available={"collapse_analysis": "The collapse analysis page is not available "
                                                "for the 'masked' family (dlm.families.masked)."})
    fake_report(reports, "gauss", GAUSSIAN, created="2026-01-02T00:00:00", bound=54.98, verdict=False, entropy=8.58,
                perplexity=300.0, pages=("train", "sample", "collapse_analysis"))
    fake_report(reports, "ar", {"model": "ar"}, created="2026-01-01T00:00:00")
    return reports


def test_index_family_and_recipe_column(three_families):
    rows = index_rows(workbook.write_index(three_families).read_text())
    family = cells(rows["masked_b4"])[1]
    assert "masked diffusion" in family
    assert "blocks of 4, clipped mask rate 0.3-0.8, sampled in 10 steps a block, rotary positions, 910 steps" in family
    assert "Gaussian diffusion" in cells(rows["gauss"])[1] and "sampled toward the predicted x0" in cells(rows["gauss"])[1]
    assert "autoregressive" in cells(rows["ar"])[1]


def test_index_likelihood_column_says_its_kind(three_families):
    rows = index_rows(workbook.write_index(three_families).read_text())
    masked, gauss, ar = (cells(rows[name])[2] for name in ("masked_b4", "gauss", "ar"))
    assert "4.50 ± 0.24" in masked and "NELBO" in masked and "64 windows x 2 draws" in masked
    assert "54.98 ± 0.24" in gauss and "bound, predicted x0" in gauss
    assert "above ln V = 4.61" in gauss and "above ln V" not in masked  # ln 100: looser than a uniform guess
    assert "4.30" in ar and "exact NLL" in ar and "±" not in ar  # the AR's validation loss is its NLL


def test_index_quality_columns_and_heldout_row(three_families):
    index = workbook.write_index(three_families).read_text()
    rows = index_rows(index)
    quality, entropy = cells(rows["ar"])[3:5]
    assert "150.0" in quality and "2.00x held-out" in quality and "teacher runs/ar" in quality
    assert "7.80 / 7.77" in entropy and "at held-out entropy" in entropy and "not at" not in entropy
    assert "temperature 1, 10 steps, 64 samples" in entropy
    assert "not at held-out entropy (+10%)" in cells(rows["gauss"])[4]  # 8.58 against 7.77
    assert "no teacher" in cells(rows["masked_b4"])[3]
    held = cells(rows["held-out text"])
    assert "75.0" in held[3] and "7.77" in held[4]
    assert list(rows).index("held-out text") == 0  # the row the others are read against comes first


def test_index_training_time_is_the_runs_not_the_notebooks(three_families):
    from dlm.core.config import load_config
    from dlm.families import family

    rows = index_rows(workbook.write_index(three_families).read_text())
    training, speed = cells(rows["masked_b4"])[5:7]
    assert "866 s" in training and "104" not in rows["masked_b4"]  # metrics.csv's time, not report.json's wall_s
    config = load_config(three_families / "masked_b4" / "run" / "config.yaml")
    parameters = sum(p.numel() for p in family("masked").new_model(config, len(VOCAB)).parameters())
    flops = 6 * parameters * 910 * config.batch_size * 2 * config.seq_len  # blocks: the clean window read too
    assert f"{flops:.2g} FLOPs" in training
    assert "2.00" in speed and "64 at 10 steps" in speed  # 64 samples in 32 s


def test_index_says_why_there_is_no_verdict(three_families):
    fake_report(three_families, "broken", GAUSSIAN, created="2026-01-04T00:00:00", status="failed")
    fake_report(three_families, "old_masked", {"model": "masked"}, created="2025-12-01T00:00:00")  # no not_available
    fake_report(three_families, "unjudged", GAUSSIAN, created="2025-12-02T00:00:00")  # no verdict.json
    rows = index_rows(workbook.write_index(three_families).read_text())
    assert cells(rows["gauss"])[-1] == "not collapsed"
    assert ("no verdict: the collapse analysis page is not available for the 'masked' family"
            in cells(rows["masked_b4"])[-1])
    assert "no verdict: the collapse analysis page is not available" in cells(rows["old_masked"])[-1]
    assert "no verdict: the report failed before its collapse analysis" in cells(rows["broken"])[-1]
    assert "no verdict: the collapse analysis page is not available for the 'ar' family" in cells(rows["ar"])[-1]
    assert "no verdict: its collapse analysis wrote none" in cells(rows["unjudged"])[-1]


def test_index_reads_an_old_report_json_from_its_run_folder(tmp_path):
    reports = tmp_path / "reports"
    # written before families, kinds and quality were recorded: only the numbers the old index showed
    fake_report(reports, "old", MASKED_BLOCKS, bound=4.5, recorded={"steps": 910, "nll_bound": 4.5, "nll_bound_se": 0.24})
    (reports / "bare").mkdir()
    (reports / "bare" / "report.json").write_text(json.dumps({"name": "bare", "params": "p.yaml", "status": "complete",
                                                               "pages": {}, "numbers": {"steps": 3}}))
    rows = index_rows(workbook.write_index(reports).read_text())
    assert "masked diffusion" in cells(rows["old"])[1] and "NELBO" in cells(rows["old"])[2]
    assert "150.0" in cells(rows["old"])[3] and "866 s" in cells(rows["old"])[5]
    bare = cells(rows["bare"])
    assert all("not recorded" in bare[i] for i in (1, 2, 3, 4, 5, 6)), bare


def test_index_table_scrolls_in_its_own_box_and_plots_quality_against_compute(three_families):
    index = workbook.write_index(three_families).read_text()
    assert re.search(r'<div class="table-box"><table>.*</table></div>', index, re.S)
    assert re.search(r"\.table-box\s*{[^}]*overflow-x:\s*auto", index)
    assert index.count('<img class="plot"') == 1 and 'src="data:image/png;base64,' in index  # gauss and ar: 2 points
    assert workbook.external_references(index) == [] and "<script" not in index
    one = three_families.parent / "one"
    fake_report(one, "scored", GAUSSIAN)
    fake_report(one, "unscored", GAUSSIAN, teacher="", perplexity=None)
    assert '<img class="plot"' not in workbook.write_index(one).read_text()  # one point is no plot


@pytest.mark.slow
def test_index_fits_1200_pixels_in_chromium(three_families):
    """The committed index and one with long failures fit the window at 1,200 x 900: the page is
    never wider, and a table wider than its box scrolls inside it; nothing loads from the network."""
    from tests.test_notebooks import CHROMIUM, CHROMIUM_ARGS, browser_or_skip

    sync_api = browser_or_skip()
    fake_report(three_families, "failed_" + "x" * 60, GAUSSIAN, created="2026-01-05T00:00:00", status="failed")
    pages = [ROOT / "reports" / "index.html", workbook.write_index(three_families)]
    requests = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            for path in pages:
                page.goto(path.as_uri())
                assert page.evaluate("document.documentElement.scrollWidth") <= 1200, path
                boxes = page.locator(".table-box")  # the reports table, and the speed table where there is one
                assert boxes.count() >= 1, path
                for index in range(boxes.count()):
                    box = boxes.nth(index).bounding_box()
                    assert box["x"] >= 0 and box["x"] + box["width"] <= 1200, (path, box)
                    overflow = boxes.nth(index).evaluate(
                        "b => [b.scrollWidth, b.clientWidth, getComputedStyle(b).overflowX]")
                    assert overflow[0] <= overflow[1] or overflow[2] == "auto", overflow
                assert page.get_by_text("held-out text").first.is_visible()  # on the first screen
        finally:
            browser.close()
    assert requests and all(url.startswith(("file:", "data:")) for url in requests)
