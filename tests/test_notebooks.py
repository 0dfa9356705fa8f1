"""End to end: the notebooks executed by papermill with tiny parameters, the report chain, the
HTML pages in headless Chromium with the network blocked, and JupyterLab serving the notebooks."""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import nbformat
import pandas as pd
import papermill
import pytest
import yaml
from papermill.exceptions import PapermillExecutionError

from dlm.workbench import workbook
from tests.conftest import ROOT, make_corpus

pytestmark = pytest.mark.slow

NOTEBOOKS = ROOT / "notebooks"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Tiny notebook parameters: one CPU thread, a handful of samples and steps.
SAMPLE = {"num_samples": 6, "threads": 1, "table_rows": 4, "curve_steps": "2,4,8,500", "curve_samples": 4}
COLLAPSE = {"num_samples": 6, "threads": 1, "max_checkpoints": 3}
CONTROL = {"num_samples": 2, "threads": 1, "length": 4, "classifier_steps": 5, "strength": "0.5"}


def tiny_preset(folder):
    """params/smoke.yaml on a made-up corpus (the real one is never needed here), one thread."""
    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    values.update(corpus=str(make_corpus(folder / "corpus.txt")), min_count=1, max_train_tokens=None, threads=1,
                  sample_steps=8, epochs=2, control_tasks="infill,prefix,length,guidance")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report built through the papermill API: each notebook executed in a temp folder."""
    folder = tmp_path_factory.mktemp("report")
    preset = tiny_preset(folder)
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal):  # what the notebooks print is echoed while they run
        report_dir = workbook.build_report(preset, name="tiny", reports_dir=folder / "reports",
                                           parameters={"sample": SAMPLE, "collapse_analysis": COLLAPSE,
                                                       "control": CONTROL})
    (folder / "terminal.txt").write_text(terminal.getvalue())
    return report_dir


def error_outputs(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_report_runs_every_notebook(report):
    for name in workbook.NOTEBOOKS:
        assert (report / f"{name}.ipynb").is_file() and error_outputs(report / f"{name}.ipynb") == []
        assert (report / f"{name}.html").is_file()
    run = report / "run"
    assert (run / "checkpoints" / "epoch_0002.pt").is_file() and (run / "metrics.csv").is_file()
    assert (run / "samples" / "samples.jsonl").is_file() and (run / "samples" / "samples.trajectory.json").is_file()
    assert json.loads((run / "samples" / "summary.json").read_text())["samples"]["tokens"] > 0
    curve = (run / "samples" / "quality_vs_steps.csv").read_text().splitlines()
    assert len(curve) == 1 + 3 + 1  # header, 2/4/8 steps (500 exceeds the run's 100), held-out text
    assert json.loads((run / "analysis" / "verdict.json").read_text())["checkpoints"] == 2
    info = json.loads((report / "report.json").read_text())
    assert info["status"] == "complete" and set(info["pages"]) == set(workbook.NOTEBOOKS)
    assert info["numbers"]["steps"] > 0 and "samples_punctuation_share" in info["numbers"]
    assert info["numbers"]["collapsed"] in (True, False)
    assert info["numbers"]["nll_bound"] > 0 and info["numbers"]["nll_bound_se"] >= 0  # train.ipynb's bound
    index = (report.parent / "index.html").read_text()
    assert ">tiny<" in index and 'href="tiny/sample.html"' in index
    assert "Gaussian diffusion" in index and "bound, predicted x0" in index  # the family and its likelihood's kind
    numbers = info["numbers"]  # recorded by the report itself, from its run folder and executed notebooks
    assert numbers["family"] == "gaussian" and numbers["likelihood"] == numbers["nll_bound"]
    assert numbers["quality_steps"] == 8 and numbers["quality_samples"] == SAMPLE["curve_samples"]
    assert numbers["samples_per_s"] > 0 and numbers["train_flops"] > 0 and numbers["teacher"] == ""


def test_train_notebook_redraws_one_live_figure_and_the_page_leaves_it_out(report):
    executed = nbformat.read(report / "train.ipynb", as_version=4)
    training = next(c for c in executed.cells if "on_metrics=" in c.source)
    live = [o for o in training.outputs if o.get("metadata", {}).get("dlm_live")]
    assert len(live) == 1 and "image/png" in live[0]["data"]  # one figure, redrawn: not one per log line
    assert len(pd.read_csv(report / "run" / "metrics.csv")) >= 3  # so it was redrawn several times
    figures = sum("image/png" in o.get("data", {}) for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    page = (report / "train.html").read_text()
    assert page[page.index("<main>"):].count("<img") == figures - 1  # the final curves have their own section


def test_report_control_page_marks_fixed_words_and_slides_over_strength(report):
    page = (report / "control.html").read_text()
    assert page.count("<mark>") >= 2  # the fixed words of the infilled and continued windows
    assert 'aria-label="strength"' in page and "strength 0.5" in page and "strength 0 (unguided)" in page
    assert "gaussian + guidance" in page and "held-out text" in page  # the control table
    classifiers = report / "run" / "classifiers"
    assert (classifiers / "latent" / "question.pt").is_file() and (classifiers / "judge" / "question.pt").is_file()


def test_report_shows_training_progress_on_the_terminal(report):
    printed = (report.parent.parent / "terminal.txt").read_text()
    steps = [line for line in printed.splitlines() if re.search(r"step +\d+/\d+ \|.*loss.*tok/s \| eta \d+:\d\d", line)]
    assert steps, printed[-2000:]
    assert "epoch" in printed and "val loss" in printed and "analysis:" in printed
    bare = [line for line in printed.splitlines() if re.fullmatch(r"  \| \S*run", line)]
    assert bare == []  # a run's name shows above its table on the page, never as a line of its own here


def test_executed_notebook_echoes_its_output_without_the_kernel_transport_warning(tmp_path, capfd):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('from the kernel')")],
                                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
    nbformat.write(notebook, tmp_path / "tiny.ipynb")
    workbook.execute(tmp_path / "tiny.ipynb", tmp_path / "out.ipynb", cwd=tmp_path, echo=True)
    out, err = capfd.readouterr()
    assert "  | from the kernel\n" in out
    assert "without encryption" not in out + err and "IPKernelApp" not in err, err


def test_unknown_parameter_is_rejected_before_training(tmp_path):
    with pytest.raises(PapermillExecutionError) as caught:
        papermill.execute_notebook(str(NOTEBOOKS / "train.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"params": str(tiny_preset(tmp_path)), "run_dir": str(tmp_path / "run"),
                                               "epoch": 1},
                                   progress_bar=False, cwd=str(tmp_path))
    assert caught.value.ename == "UserError" and "Did you mean 'epochs'?" in caught.value.evalue
    assert not (tmp_path / "run").exists()


def test_report_pages_are_self_contained(report):
    pages = [report / f"{name}.html" for name in workbook.NOTEBOOKS] + [report.parent / "index.html"]
    for page in pages:
        text = page.read_text()
        assert workbook.external_references(text) == [], page.name
        assert not re.search(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", text, re.I), page.name
        assert "application/vnd.jupyter.widget" not in text
    train = (report / "train.html").read_text()
    assert train.count("data:image/png;base64,") >= 2  # loss curves, training curves
    assert "loss" in train and "step" in train
    assert train.index("Result") < train.index("Configuration") and "<details" in train  # config folded, last
    sample = (report / "sample.html").read_text()
    assert 'type="range"' in sample and sample.count("data:image/png;base64,") >= 3
    assert "Quality against sampling steps" in sample
    collapse = (report / "collapse_analysis.html").read_text()
    assert collapse.index("Verdict") < collapse.index("Sample statistics over training")  # the verdict first
    assert collapse.count("data:image/png;base64,") >= 5


@pytest.fixture(scope="module")
def lab_train(tmp_path_factory):
    """One train.ipynb run through papermill's command line, started in a checkout's notebooks/ as
    JupyterLab starts its kernel (one run serves the two tests below): the preset, a -f file over
    it and -p values over both, with relative paths. Returns the project folder."""
    project = tmp_path_factory.mktemp("project")
    (project / "dlm").mkdir()
    (project / "dlm" / "__init__.py").write_text("")  # a checkout's marks: dlm/ and params/
    (project / "params").mkdir()
    (project / "notebooks").mkdir()
    tiny_preset(project / "params")
    (project / "notebooks" / "more.yaml").write_text("epochs: 3\nseq_len: 12\n")
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOKS / "train.ipynb"), str(project / "out.ipynb"),
         "-p", "params", "params/tiny.yaml", "-f", "more.yaml", "-p", "epochs", "1", "-p", "run_dir", "runs/lab",
         "-p", "samples_per_checkpoint", "1", "-p", "nll_draws", "0", "--no-progress-bar"],
        cwd=project / "notebooks", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return project


def test_papermill_command_line_p_wins_over_f(lab_train):
    config = yaml.safe_load((lab_train / "runs" / "lab" / "config.yaml").read_text())
    assert config["epochs"] == 1  # -p beats -f
    assert config["seq_len"] == 12  # -f beats the preset
    assert config["embed_dim"] == 16 and config["progress"] is True  # the preset; a live bar in a notebook
    assert error_outputs(lab_train / "out.ipynb") == []


def test_train_notebook_started_in_notebooks_says_how_long_its_run_trained(lab_train):
    """JupyterLab starts the kernel in notebooks/: the relative run_dir resolves against the project
    root, and the line that ends the training reads that run's metrics.csv (it once looked under
    notebooks/ and said "in an unrecorded time" while the result table said 26.6 s)."""
    metrics = pd.read_csv(lab_train / "runs" / "lab" / "metrics.csv")  # the run is in the project, not in notebooks/
    assert not (lab_train / "notebooks" / "runs").exists()
    executed = nbformat.read(lab_train / "out.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream")
    assert f"in {metrics['elapsed_s'].max():.1f}s of training" in printed and "unrecorded" not in printed, printed[-800:]
    assert "Not computed here (nll_draws is 0)" in printed  # its section says why it is empty


def test_bad_parameter_names_the_cell(tmp_path):
    with pytest.raises(PapermillExecutionError) as caught:
        papermill.execute_notebook(str(NOTEBOOKS / "train.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"params": str(tiny_preset(tmp_path)), "run_dir": str(tmp_path / "run"),
                                               "epochs": "three"},
                                   progress_bar=False, cwd=str(tmp_path))
    error = caught.value
    assert error.ename == "ConfigError" and "'epochs' got 'three'" in error.evalue
    assert error.exec_count is not None and "notebook_config" in error.source
    assert f'In [{error.exec_count}]' in str(error)
    assert not (tmp_path / "run").exists()


def test_report_from_a_trained_run_draws_pages_without_training_again(report, tmp_path):
    source = report / "run"
    before = (source / "metrics.csv").read_text()
    again = workbook.build_report(report.parent.parent / "tiny.yaml", name="again", reports_dir=tmp_path,
                                  from_run=source, parameters={"sample": {**SAMPLE, "curve_steps": ""},  # "" skips the curve
                                                               "collapse_analysis": COLLAPSE,
                                                               "train": {"dropout": 0.25}})
    assert (again / "train.html").is_file() and (again / "collapse_analysis.html").is_file()
    assert (again / "run" / "metrics.csv").read_text() == before  # nothing was trained
    assert (source / "metrics.csv").read_text() == before and (source / "checkpoints" / "last.pt").is_file()
    linked = again / "run" / "checkpoints" / "epoch_0002.pt"
    assert linked.stat().st_ino == (source / "checkpoints" / "epoch_0002.pt").stat().st_ino  # linked, not copied
    # everything that is written in place is a copy of its own
    assert (again / "run" / "metrics.csv").stat().st_ino != (source / "metrics.csv").stat().st_ino
    # its log says what the run took (one invocation: its last elapsed_s), not the 0 s of a resume with nothing left
    metrics = pd.read_csv(source / "metrics.csv")
    executed = nbformat.read(again / "train.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream")
    assert f"already trained: {metrics['step'].max()} steps" in printed, printed[-500:]
    assert f"in {metrics['elapsed_s'].max():.1f}s of training" in printed and " in 0.0s" not in printed
    # the run kept its dropout: its page shows the run's config and names the key it did not apply
    assert "asked for but not applied" in printed and "dropout 0.25 (the run's: 0.0)" in printed
    with pytest.raises(workbook.ReportError, match="no trained run"):
        workbook.build_report(report.parent.parent / "tiny.yaml", name="none", reports_dir=tmp_path, from_run=tmp_path)


def test_report_command_reads_notebook_parameters():
    from dlm.cli import notebook_parameters

    assert notebook_parameters(["sample.num_samples=200", "collapse_analysis.steps=50", "sample.teacher_dir=runs/ar"]) == {
        "sample": {"num_samples": 200, "teacher_dir": "runs/ar"}, "collapse_analysis": {"steps": 50}}
    with pytest.raises(workbook.ReportError, match="NOTEBOOK.KEY=VALUE"):
        notebook_parameters(["num_samples=200"])


def test_failing_notebook_stops_the_chain_and_keeps_earlier_steps(tmp_path):
    preset = tiny_preset(tmp_path)
    reports = tmp_path / "reports"
    with pytest.raises(workbook.NotebookFailed) as caught:
        # a value only the sample notebook can find wrong (the report checks what it can before training)
        workbook.build_report(preset, name="broken", reports_dir=reports,
                              parameters={"sample": {**SAMPLE, "checkpoint": "missing.pt"}})
    failure = caught.value
    assert isinstance(failure.__cause__, PapermillExecutionError)
    assert failure.notebook == "sample" and failure.ename == "FileNotFoundError" and "missing.pt" in failure.evalue
    assert "sample.ipynb failed in cell In [" in str(failure)
    report = reports / "broken"
    assert (report / "train.html").is_file() and (report / "run" / "checkpoints" / "last.pt").is_file()
    assert (report / "sample.html").is_file() and not (report / "collapse_analysis.ipynb").exists()
    info = json.loads((report / "report.json").read_text())
    assert info["status"] == "failed" and info["failure"]["notebook"] == "sample"
    assert "failed in sample.ipynb" in (reports / "index.html").read_text()


def browser_or_skip():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("DLM_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (install Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    return pytest.importorskip("playwright.sync_api")


def test_sample_report_slider_works_offline_in_chromium(report):
    sync_api = browser_or_skip()
    requests, blocked = [], []

    def route(route):
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto((report / "sample.html").as_uri())
            slider = page.locator(".dlm-steps input[type=range]").first
            label = page.locator(".dlm-steps .dlm-step-label").first
            visible = page.locator(".dlm-steps .dlm-frame:not([hidden])").first
            maximum = int(slider.get_attribute("max"))
            assert maximum > 0 and slider.input_value() == str(maximum)
            final_label, final_text = label.inner_text(), visible.inner_text()
            assert final_label.startswith("step 8 of 8")
            slider.focus()
            page.keyboard.press("Home")
            assert slider.input_value() == "0" and label.inner_text().startswith("step 1 of 8")
            texts = {visible.inner_text()}
            for _ in range(maximum):
                page.keyboard.press("ArrowRight")
                texts.add(visible.inner_text())
            assert label.inner_text() == final_label
            assert len(texts) > 1 and final_text in texts  # the text changes along the chain
            assert page.locator(".dlm-steps mark").count() > 0  # changed tokens are marked
            page.goto((report.parent / "index.html").as_uri())
            page.get_by_role("link", name="samples").first.click()
            page.wait_for_load_state()
            assert page.url.endswith("/sample.html")
        finally:
            browser.close()
    assert blocked == []
    assert requests and all(url.startswith(("file:", "data:")) for url in requests)


FIRST_SCREEN = {"width": 1200, "height": 900}
# where each page's result is: a table the first screen must show (by a header cell of it)
RESULT_TABLES = {"train": "val loss", "sample": "sample", "collapse_analysis": "collapsed"}  # exact header text
TOP = "e => e.getBoundingClientRect().top + window.scrollY"
OUTPUT_TOP = "e => e.closest('.jp-OutputArea-output').getBoundingClientRect().top + window.scrollY"


def test_report_pages_open_on_their_result(report):
    sync_api = browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=FIRST_SCREEN)
            for name, header in RESULT_TABLES.items():
                page.goto((report / f"{name}.html").as_uri())
                figure = page.locator("img").first.bounding_box()
                assert 0 <= figure["y"] and figure["y"] + figure["height"] <= FIRST_SCREEN["height"], (name, figure)
                exact = re.compile(f"^{re.escape(header)}$")
                table = page.locator("table", has=page.locator("th", has_text=exact)).first.bounding_box()
                assert table["y"] + min(table["height"], 100) <= FIRST_SCREEN["height"], (name, table)
                # the introduction and its papermill commands: folded, after the results
                about = page.locator("details.dlm-about")
                assert about.count() == 1 and about.get_attribute("open") is None
                assert about.evaluate(TOP) > figure["y"] + figure["height"]
                assert not page.get_by_text("papermill notebooks/").first.is_visible()
                assert page.evaluate("document.documentElement.scrollWidth") <= FIRST_SCREEN["width"], name
            page.goto((report / "train.html").as_uri())
            log = page.locator(".jp-OutputArea-output", has_text=re.compile(r"trained \d+ steps")).first  # the log
            assert log.evaluate(OUTPUT_TOP) > page.get_by_role("heading", name="Configuration").evaluate(TOP)
            page.goto((report / "collapse_analysis.html").as_uri())
            log = page.locator(".jp-OutputArea-output", has_text="analysis:").first  # the analysis log, last
            assert log.evaluate(OUTPUT_TOP) > page.locator("img").last.evaluate(TOP)
        finally:
            browser.close()


def test_a_wide_table_scrolls_inside_its_box_and_the_page_keeps_the_window_width(report):
    sync_api = browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for width in (1000, 700):  # a window narrower than the table; JupyterLab's CSS has a narrow-screen layout
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto((report / "sample.html").as_uri())
                table = page.locator("table", has=page.locator("th", has_text="agreement")).first  # quality vs steps
                table.scroll_into_view_if_needed()
                box = table.bounding_box()
                assert box["width"] > width - 40  # wider than the window's text column: the case this is about
                assert page.evaluate("document.documentElement.scrollWidth") <= width
                page.mouse.move(box["x"] + 40, box["y"] + 20)
                page.mouse.wheel(300, 0)  # a sideways scroll over the table moves the table, not the page
                page.wait_for_timeout(300)
                assert table.evaluate("t => t.closest('.jp-OutputArea-output').scrollLeft") > 0, width
                assert page.evaluate("window.scrollX") == 0
                page.close()
        finally:
            browser.close()


# --- every page at 1,200 x 900: nothing past the window's edge, no empty section, sliders in range ----

# What a reader sees of a page, measured in the browser: how wide the document is; each element that
# reaches past the window's left or right edge without a box of its own that scrolls it (overflow-x
# auto or scroll, itself inside the window); each heading whose section (up to the next heading of
# the same or a higher level) shows nothing (on a notebook page: no output of a code cell, so a
# caption alone does not count; the folded "About this page" block belongs to no section); each
# slider frame's label; and each range input's width and number of positions.
PAGE_FACTS = r"""
() => {
  const width = window.innerWidth;
  const shown = e => e.getClientRects().length > 0;
  const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
  const outside = [];
  for (const e of document.body.querySelectorAll('*')) {
    const box = e.getBoundingClientRect();
    if (!shown(e) || (box.right <= width + 0.5 && box.left >= -0.5)) continue;
    let holder = e.parentElement;
    while (holder && !scrolls(holder)) holder = holder.parentElement;
    const held = holder && holder !== document.documentElement && holder !== document.body
      && holder.getBoundingClientRect().right <= width + 0.5 && holder.getBoundingClientRect().left >= -0.5;
    if (!held && outside.length < 5)
      outside.push(`${e.tagName.toLowerCase()}.${e.className} ${Math.round(box.left)}..${Math.round(box.right)}px`);
  }
  const notebook = !!document.querySelector('.jp-Notebook');
  const headings = [...document.querySelectorAll('h1, h2, h3, h4, h5, h6')];
  const all = [...document.body.querySelectorAll('*')];
  const content = e => {
    if (e.closest('h1, h2, h3, h4, h5, h6, .dlm-about, style, script') || !shown(e)) return false;
    if (notebook && !e.closest('.jp-OutputArea-output')) return false;
    if (['IMG', 'INPUT', 'TABLE', 'SVG', 'CANVAS'].includes(e.tagName)) return true;
    return [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  };
  const empty = headings.filter((h, i) => {
    const level = +h.tagName[1];
    const end = headings.slice(i + 1).find(next => +next.tagName[1] <= level);
    return !all.some(e => (h.compareDocumentPosition(e) & Node.DOCUMENT_POSITION_FOLLOWING) && !h.contains(e)
      && (!end || (e.compareDocumentPosition(end) & Node.DOCUMENT_POSITION_FOLLOWING)) && content(e));
  }).map(h => h.textContent.replace('\u00b6', '').trim());
  return {scrollWidth: document.documentElement.scrollWidth, outside, empty,
          labels: [...document.querySelectorAll('.dlm-frame')].map(f => f.getAttribute('data-label')),
          ranges: [...document.querySelectorAll('input[type=range]')].map(
            r => ({name: r.getAttribute('aria-label'), positions: +r.max, px: r.getBoundingClientRect().width}))};
}
"""
MIN_PX_PER_POSITION = 2  # a slider position narrower than this cannot be picked with a mouse


def slider_problems(facts: dict) -> list[str]:
    """Labels past their range ('step 640 of 10', 'block 5 of 4') and sliders too crowded to use."""
    problems = [f"slider '{slider['name']}': {slider['positions'] + 1} positions on {slider['px']:.0f} px"
                for slider in facts["ranges"]
                if slider["positions"] and slider["px"] / slider["positions"] < MIN_PX_PER_POSITION]
    for label in facts["labels"]:
        for what, (at, of) in ((w, m.groups()) for w in ("block", "step")
                               for m in re.finditer(rf"\b{w} (\d+) of (\d+)", label)):
            if not 1 <= int(at) <= int(of):
                problems.append(f"{what} label out of range: '{label}'")
    return problems[:5]


def page_check(facts: dict, check: str, width: int = 1200) -> list[str]:
    """What fails one check of a page's facts (PAGE_FACTS): [] when it passes."""
    if check == "width":
        wide = [f"document {facts['scrollWidth']} px wide"] if facts["scrollWidth"] > width else []
        return wide + [f"past the edge: {e}" for e in facts["outside"]]
    if check == "headings":
        return [f"empty section: '{heading}'" for heading in facts["empty"]]
    return slider_problems(facts)


def measure_pages(pages, viewport=FIRST_SCREEN) -> dict:
    """PAGE_FACTS of each page (a path), opened from the file system with the network blocked."""
    sync_api = browser_or_skip()
    facts = {}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=viewport)
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                          else route.abort())
            page = context.new_page()
            for path in pages:
                page.goto(path.as_uri())
                facts[path] = page.evaluate(PAGE_FACTS)
        finally:
            browser.close()
    return facts


COMMITTED_PAGES = sorted((ROOT / "reports").glob("*/*.html")) + [ROOT / "reports" / "index.html"]
PAGE_CHECKS = ("width", "headings", "slider")
# The committed pages drawn before these checks, and the check each fails until it is redrawn with
# the commands of reports/README.md (the runs' checkpoints are not committed: a redraw trains again,
# or takes --from_run of a run kept elsewhere).
DRAWN_BEFORE: dict[tuple[str, str], str] = {}  # none since blocks1/ was redrawn (2026-12-07)


@pytest.fixture(scope="module")
def committed_facts():
    return measure_pages(COMMITTED_PAGES)


@pytest.mark.parametrize("check", PAGE_CHECKS)
@pytest.mark.parametrize("path", COMMITTED_PAGES, ids=lambda path: path.relative_to(ROOT / "reports").as_posix())
def test_committed_pages_at_1200_by_900(committed_facts, path, check, request):
    """Every committed page and the index, as a reader opens them at 1,200 x 900."""
    known = DRAWN_BEFORE.get((path.relative_to(ROOT / "reports").as_posix(), check))
    if known:
        request.applymarker(pytest.mark.xfail(reason=known, strict=False))
    assert page_check(committed_facts[path], check) == []


@pytest.fixture(scope="module")
def fresh_facts(report):
    """PAGE_FACTS of the fresh report's pages and its index, measured in one browser."""
    return measure_pages([report / f"{name}.html" for name in workbook.NOTEBOOKS] + [report.parent / "index.html"])


def test_a_fresh_report_s_pages_pass_every_page_check(report, fresh_facts):
    pages = [report / f"{name}.html" for name in workbook.NOTEBOOKS]
    assert {(path.name, check): page_check(fresh_facts[path], check) for path in pages
            for check in PAGE_CHECKS if page_check(fresh_facts[path], check)} == {}


def test_a_fresh_index_fits_the_window(report, fresh_facts):
    facts = fresh_facts[report.parent / "index.html"]
    assert [problem for check in PAGE_CHECKS for problem in page_check(facts, check)] == []


def test_the_block_slider_moves_to_a_block_then_over_its_steps(tmp_path):
    """A block run's slider in Chromium: 'block b of B, step s of S' always within range, the block
    slider picks the block, the step slider the steps of that block, and t runs down within each."""
    from dlm.workbench import views

    itos = ["<pad>", "<unk>", "a", "b", "c"]
    blocks, steps = 8, 10
    frames = [{"index": b * steps + s, "t": 1999 - s * 222, "ids": [[2 + (b + s) % 3] * 4]}
              for b in range(blocks) for s in range(steps)]
    page_path = tmp_path / "slider.html"
    page_path.write_text(f"<!DOCTYPE html><html><body>{views.slider_html(frames, itos, total_steps=steps)}</body></html>")
    (facts,) = measure_pages([page_path]).values()
    assert slider_problems(facts) == [] and len(facts["ranges"]) == 2
    sync_api = browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=FIRST_SCREEN)
            page.goto(page_path.as_uri())
            label = page.locator(".dlm-step-label")
            block, step = page.locator("input.dlm-block"), page.locator("input.dlm-step")
            assert label.inner_text() == f"block {blocks} of {blocks}, step {steps} of {steps} (t = 1)"
            block.focus()
            page.keyboard.press("Home")
            assert label.inner_text() == f"block 1 of {blocks}, step {steps} of {steps} (t = 1)"
            step.focus()
            page.keyboard.press("Home")
            assert label.inner_text() == f"block 1 of {blocks}, step 1 of {steps} (t = 1999)"
            seen = set()
            for _ in range(steps - 1):
                page.keyboard.press("ArrowRight")
                seen.add(label.inner_text())
            assert len(seen) == steps - 1 and all(text.startswith("block 1 of") for text in seen)
            block.focus()
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            assert label.inner_text() == f"block 3 of {blocks}, step {steps} of {steps} (t = 1)"
            assert page.locator(".dlm-frame:not([hidden])").count() == 1
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """Terminate the server we started (its own process group), then kill it if it lingers."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_jupyterlab_serves_the_notebooks(tmp_path):
    token, port = "dlm-test-token", free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    log = open(tmp_path / "jupyter.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--IdentityProvider.token={token}", f"--port={port}",
         "--ip=127.0.0.1", f"--ServerApp.root_dir={ROOT}", "--ServerApp.port_retries=0",
         "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/notebooks",
                                         headers={"Authorization": f"token {token}"})
        listing, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    listing = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert listing is not None, (tmp_path / "jupyter.log").read_text()[-3000:]
        names = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
        assert {"train.ipynb", "sample.ipynb", "collapse_analysis.ipynb"} <= names
        denied = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/notebooks")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(denied, timeout=5)
    finally:
        stop(server)
        log.close()
    assert server.returncode is not None

