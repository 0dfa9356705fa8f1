"""Reports: run train -> sample -> collapse_analysis through papermill into reports/NAME/, export
each executed notebook to one self-contained HTML page, and keep reports/index.html up to date.

    dlm report params/default.yaml [--name NAME]      (or: python -m dlm report ...)

reports/NAME/ holds the executed notebooks (*.ipynb), their HTML pages (*.html), the run folder
(run/: config, provenance.json, checkpoints, metrics.csv, samples, analysis) and report.json (status,
timings, provenance: git commit, packages and each training invocation's settings, and the key
numbers the index shows). A failing notebook stops the chain: its executed copy and page
are still written (papermill marks the failing cell), earlier steps' files stay, and the error
names the notebook, the cell and the exception.

The pages work with no network: the nbconvert template below drops the require.js, MathJax,
mermaid and widget-manager scripts the stock template loads from CDNs, widget views are removed
from the outputs (the sample notebook's slider has an offline HTML fallback in the same output),
figures are embedded PNGs, and `external_references` checks the result.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import html
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm import families
from dlm.core.config import Config, current_model, did_you_mean, field_types, load_config
from dlm.core.data import atomic_write_bytes
from dlm.core.errors import UserError
from dlm.core.lockfile import FolderLock, FolderLocked
from dlm.runs.provenance import environment, read_provenance
from dlm.runs.rundir import RunDir, folder_entries, listing
from dlm.workbench.notebook import LIVE_MARK, assigned_names, config_overrides, package_root, project_root
from dlm.workbench.shipped import EditedNotebook, check_as_shipped, digest

logger = logging.getLogger("dlm")

NOTEBOOKS = ("train", "sample", "collapse_analysis", "control")  # control: when the preset names control_tasks
PAGE_NEEDS = {"collapse_analysis": "geometry"}  # what a page asks of the run's family (dlm.families SUPPORTS)
# Notebook parameters that set a sampler option (a SampleOptions field), with the value that leaves it
# to the run: given for a family whose sampler does not read it, the report is refused before it starts.
SAMPLER_PARAMETERS = {
    "train": {"preview_steps": ("steps", -1)},
    "sample": {"steps": ("steps", -1), "curve_steps": ("steps", ""), "clamp": ("clamp", None),
               "spacing": ("spacing", ""), "record_every": ("record_every", 0), "sampler": ("sampler", "")},
    "control": {"steps": ("steps", -1), "sampler": ("sampler", "")},
}
TITLES = {"train": "training", "sample": "samples", "collapse_analysis": "collapse analysis", "control": "control"}
WIDGET_MIMETYPES = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# The stock 'lab' template, minus every script it would fetch from a CDN.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_css -%}
<style>{{ resources.dlm_css }}</style>
{%- endblock html_head_css -%}
{%- block data_png scoped -%}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
 alt="{{ ((output | get_metadata('alt', 'image/png')) or 'figure') | escape_html }}">
</div>
{%- endblock data_png -%}
"""
# A table wider than the window scrolls inside its output box; the page itself never gets wider.
PAGE_CSS = """
.jp-OutputArea-child .jp-OutputArea-output.jp-RenderedHTMLCommon {display: block; overflow-x: auto; max-width: 100%;}
.jp-OutputArea-output pre {white-space: pre-wrap; overflow-wrap: anywhere;}
details.dlm-about, details.dlm-log {margin: 0.5em 0;}
details.dlm-about > summary, details.dlm-log > summary {cursor: pointer; color: #555;}
"""
# A script, stylesheet, image or frame that the browser would fetch from another machine.
EXTERNAL = re.compile(
    r"""<(?:script|link|img|iframe|source|embed)\b[^>]*?\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|@import\s+(?:url\()?["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""",
    re.IGNORECASE,
)


class ReportError(RuntimeError):
    """A report that cannot be built; the message says why and what to do."""


class ReportExistsError(ReportError):
    """reports/NAME/ already holds a report and --overwrite was not given."""


@contextlib.contextmanager
def report_lock(report_dir: Path):
    """Hold REPORTS_DIR/.NAME.lock while a report is written: a second `dlm report` of the same name
    (with --overwrite or not) is refused instead of deleting the folder the first is training in.
    The lock file sits beside the folder, so --overwrite's rmtree never removes a held lock."""
    lock = FolderLock(report_dir.parent / f".{report_dir.name}.lock")
    try:
        lock.__enter__()
    except FolderLocked as held:
        raise ReportError(f"'{report_dir}' is being written right now by {held.holder}. Wait for that report to "
                          f"end (or stop it), or write this one under another --name.") from None
    try:
        yield
    finally:
        lock.__exit__()


class ChainFailed(ReportError):
    """A notebook of the chain failed or could not run (not a bad input of the command line)."""


class ReportInterrupted(KeyboardInterrupt):
    """Ctrl-C while a notebook ran: its kernel is stopped and report.json says "interrupted"."""


class NotebookFailed(ChainFailed):
    """A notebook of the chain raised; `error` is papermill's PapermillExecutionError."""

    def __init__(self, notebook: str, error: Exception, executed: Path, page: Path | None, report_dir: Path):
        self.notebook = notebook
        self.error = error
        self.executed = executed
        self.page = page
        self.cell = getattr(error, "exec_count", None)
        self.cell_index = getattr(error, "cell_index", None)
        self.ename = getattr(error, "ename", type(error).__name__)
        self.evalue = getattr(error, "evalue", str(error))
        source = (getattr(error, "source", "") or "").strip().splitlines()
        self.first_line = source[0] if source else ""
        where = f"cell In [{self.cell}]" if self.cell is not None else "a cell"
        shown = f" ({self.first_line[:80]})" if self.first_line else ""
        page_note = f", its page {page}" if page else ""
        super().__init__(
            f"{notebook}.ipynb failed in {where}{shown}: {self.ename}: {self.evalue}. "
            f"The executed notebook is at {executed}{page_note}; what earlier steps wrote is kept in {report_dir}."
        )

    def summary(self) -> dict:
        return {"notebook": self.notebook, "cell": self.cell, "cell_index": self.cell_index,
                "source": self.first_line, "error": f"{self.ename}: {self.evalue}"}


# --- locating things ----------------------------------------------------------------------------

def notebooks_dir() -> Path:
    """The notebooks/ of this checkout (where dlm was imported from, else the working directory's)."""
    for root in (package_root(), project_root()):
        if root is not None and (root / "notebooks").is_dir():
            return root / "notebooks"
    raise ReportError("No notebooks/ folder found: run dlm report from a checkout of the dlm repository.")


def path_for_kernel(path: Path, cwd: Path) -> str:
    """A path parameter for a kernel started in `cwd`. Relative (so no machine path lands in a
    report) when `cwd` is the project root, where dlm.notebook resolves relative inputs and outputs
    alike; absolute otherwise."""
    path = Path(path).resolve()
    if project_root(cwd) == cwd.resolve():
        try:
            return str(path.relative_to(cwd.resolve()))
        except ValueError:
            pass
    return str(path)


def declared_parameters(notebook: Path) -> list[str]:
    """The names that the notebook's cell tagged `parameters` assigns."""
    import nbformat

    cells = [c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    return [name for cell in cells for name in assigned_names(cell.source)]


def check_notebook_parameters(parameters: Mapping[str, Mapping[str, Any]], source: Path) -> None:
    """Every --param NOTEBOOK.KEY against that notebook's parameters (the train notebook's also
    every Config key, as its check_parameters call says), before the first notebook starts: a typo
    in a later notebook's key is found now, not after training."""
    for notebook, values in parameters.items():
        declared = declared_parameters(source / f"{notebook}.ipynb")
        allowed = set(declared) | (set(field_types()) if notebook == "train" else set())
        for key in values:
            if key not in allowed:
                raise ReportError(f"--param {notebook}.{key}: {notebook}.ipynb has no parameter '{key}'."
                                  f"{did_you_mean(key, allowed)} Its parameters: {', '.join(declared)}.")


STEP_PARAMETERS = {("train", "preview_steps"), ("sample", "steps"), ("collapse_analysis", "steps"),
                   ("control", "steps")}  # -1: the run's sample_steps
AR_PARAMETERS = {("sample", "teacher_dir"), ("control", "ar_run")}  # "": none


def model_of_run(path: str | Path, what: str) -> str:
    """The model family of the run folder `path` (its config.yaml, else its last.pt's config)."""
    import yaml

    run = RunDir(path)
    if run.config.is_file():
        return current_model((yaml.safe_load(run.config.read_text()) or {}).get("model", Config.model))
    if run.last_checkpoint.is_file():
        from dlm.core.checkpoint import load_checkpoint

        return current_model(load_checkpoint(run.last_checkpoint)["config"].get("model", Config.model))
    raise ReportError(f"{what} '{path}' holds no trained run (no config.yaml, no checkpoints/last.pt).")


def check_report_values(config, parameters: Mapping[str, Mapping[str, Any]], from_run: str | Path | None) -> None:
    """What a notebook would refuse only once it runs, checked before the first one starts (a
    report stopped after training blocks its name): the run's keys against its family, a --from_run
    of the preset's family, every sampling step count, an AR run wherever one is asked for."""
    from dlm.runs.sample import SampleOptions, check_options
    from dlm.workbench.notebook import chain_timesteps, resolve_input, step_counts

    families.family(config.model).check_config(config)
    if from_run is not None and model_of_run(from_run, "--from_run") != config.model:
        raise ReportError(f"--from_run '{from_run}' holds a run of model '{model_of_run(from_run, '--from_run')}', "
                          f"but the preset (with its --param train.* keys) trains model '{config.model}': give the "
                          f"preset that run was trained with, or leave out --from_run.")
    asked = [(f"--param {notebook}.{key}", value) for (notebook, key) in sorted(STEP_PARAMETERS)
             if (value := parameters.get(notebook, {}).get(key, -1)) != -1]
    curve = parameters.get("sample", {}).get("curve_steps", "")
    if curve and "steps" in families.family(config.model).SAMPLE_OPTIONS:
        total = chain_timesteps(config)
        asked += [("--param sample.curve_steps", count) for count in step_counts(curve, total, "curve_steps")]
    for flag, value in asked:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ReportError(f"{flag} takes a number of steps (-1: the run's sample_steps), got {value!r}.")
        try:
            check_options(config, SampleOptions.from_config(config, steps=value))
        except UserError as error:
            raise ReportError(f"{flag}: {error}") from None
    for notebook, key in sorted(AR_PARAMETERS):
        teacher = parameters.get(notebook, {}).get(key, "")
        if teacher:
            try:
                model = model_of_run(resolve_input(teacher), f"--param {notebook}.{key}")
            except FileNotFoundError as missing:
                raise ReportError(f"--param {notebook}.{key}: {missing}") from None
            if not families.supports(model, "likelihood_exact"):
                raise ReportError(f"--param {notebook}.{key} '{teacher}' is a '{model}' run, not an autoregressive "
                                  f"one: train one with dlm train-ar params/ar.yaml.")


# --- running and exporting one notebook ---------------------------------------------------------

class Echo:
    """A file-like that writes the text a kernel prints to a terminal stream, each line indented,
    so a long notebook (a training run) shows its log lines while it runs."""

    def __init__(self, stream, prefix: str = "  | "):
        self.stream = stream
        self.prefix = prefix
        self.at_line_start = True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


STARTED_KERNELS: weakref.WeakSet = weakref.WeakSet()  # the kernel managers of this process's notebooks


def kernel_manager_class():
    """nbclient's kernel manager, talking to the kernel over local IPC sockets rather than TCP
    (ipykernel warns on every TCP start that its traffic is unencrypted, and `dlm report` would echo
    that warning once per notebook). Windows has no IPC transport: TCP there. Every manager is
    kept in STARTED_KERNELS, so that a Ctrl-C can stop its kernel (`stop_kernels`)."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if os.name != "nt":
                self.transport = "ipc"
            STARTED_KERNELS.add(self)

    return IPCKernelManager


def stop_kernels() -> None:
    """After a Ctrl-C: kill every notebook kernel still running (it runs in a session of its own, so
    the terminal's interrupt never reached it) and remove its connection file and IPC sockets,
    quietly: the interrupted chain's own clean-up never ran."""
    for manager in list(STARTED_KERNELS):
        process = getattr(getattr(manager, "provisioner", None), "process", None)
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
                process.wait(timeout=10)
        for cleanup in (manager.cleanup_connection_file, manager.cleanup_ipc_files):
            with contextlib.suppress(Exception):
                cleanup()
        STARTED_KERNELS.discard(manager)


def execute(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any] | None = None,
            cwd: str | Path | None = None, kernel_name: str | None = None, echo: bool = False) -> Path:
    """Execute a notebook with papermill (no progress bar). `echo`: what the cells print (e.g. the
    training loop's log lines with loss, tokens/s and ETA) goes to this process's stdout and stderr
    while they run. Raises PapermillExecutionError, after papermill has written the executed copy
    with the failing cell marked."""
    import papermill

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    streams = {"stdout_file": Echo(sys.stdout), "stderr_file": Echo(sys.stderr)} if echo else {}
    papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters or {}), cwd=cwd and str(cwd),
                               kernel_name=kernel_name, progress_bar=False, log_output=False,
                               kernel_manager_class=kernel_manager_class(), **streams)
    return output


def strip_widgets(nb) -> Any:
    """Drop widget views and saved widget state: a static page cannot run them, and nbconvert would
    load the widget manager from a CDN. Outputs that were only a widget are removed, and so is a live
    figure (LIVE_MARK) that the page shows again in its own section. Figures get
    the nearest heading above them as their alternative text."""
    nb.metadata.pop("widgets", None)
    heading = "figure"
    for cell in nb.cells:
        if cell.get("cell_type") == "markdown":
            titles = re.findall(r"^#+\s*(.+)$", cell.get("source", ""), re.M)
            heading = titles[-1].strip() if titles else heading
            continue
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("metadata", {}).get(LIVE_MARK):  # the live loss curves: drawn again, final, below
                continue
            if "image/png" in output.get("data", {}):
                output.setdefault("metadata", {}).setdefault("image/png", {}).setdefault("alt", f"figure: {heading}")
            data = output.get("data")
            if data is not None and any(m in data for m in WIDGET_MIMETYPES):
                for mimetype in WIDGET_MIMETYPES:
                    data.pop(mimetype, None)
                if set(data) <= {"text/plain"}:
                    continue
            kept.append(output)
        cell["outputs"] = kept
    return nb


INTRO_TAG = "report-intro"  # a notebook's introduction: its title stays first, the rest folds at the page's end
BELOW_TAG = "report-below"  # a cell (the training log) that moves below the results on the page


def lead_with_results(nb) -> Any:
    """Reorder a page so that its first screen shows results: the introduction (a cell tagged
    report-intro) keeps only its title on top, its text (what the page shows, the papermill
    commands) becomes a folded block at the end; cells tagged report-below (the training and its
    log) move after the results, in their order. JupyterLab shows the notebook as written."""
    from nbconvert.filters.markdown import markdown2html
    from nbformat.v4 import new_code_cell, new_markdown_cell

    top, below, about = [], [], []
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if INTRO_TAG in tags and cell.get("cell_type") == "markdown":
            title, _, text = cell.source.partition("\n")
            top.append(new_markdown_cell(title))
            if text.strip():  # an HTML output (a markdown cell would close <details> at its first blank line)
                folded = ('<details class="dlm-about"><summary>About this page: what it shows and the commands '
                          f'that make it</summary>{markdown2html(text.strip())}</details>')
                about.append(new_code_cell(outputs=[_html_output(folded, text.strip())]))
        elif BELOW_TAG in tags:
            below.append(cell)
        else:
            top.append(cell)
    nb.cells = top + below + about
    return nb


FOLD_LINES = 12  # printed output longer than this is folded on a page (the training log)


def fold_long_streams(nb, max_lines: int = FOLD_LINES) -> Any:
    """Printed output of more than `max_lines` lines (the training log) becomes a folded
    <details> block on the page, its last line in the summary, so a page leads with its results;
    JupyterLab and the terminal still show every line as it is printed."""
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        merged = []  # a kernel prints a log line per message: join neighbouring pieces of one stream
        for output in cell.get("outputs", []):
            previous = merged[-1] if merged else None
            if (output.get("output_type") == "stream" and previous is not None
                    and previous.get("output_type") == "stream" and previous.get("name") == output.get("name")):
                previous["text"] = previous.get("text", "") + output.get("text", "")
            else:
                merged.append(output)
        cell["outputs"] = merged
        for index, output in enumerate(merged):
            if output.get("output_type") != "stream":
                continue
            text = output.get("text", "")
            lines = text.rstrip("\n").splitlines()
            if len(lines) <= max_lines:
                continue
            summary = f"log: {len(lines)} lines (last: {lines[-1].strip()[:120]})"
            folded = (f'<details class="dlm-log"><summary>{html.escape(summary)}</summary>'
                      f'<pre style="max-height:30em;overflow:auto">{html.escape(text)}</pre></details>')
            cell["outputs"][index] = _html_output(folded, text)
    return nb


def _html_output(html_text: str, plain: str):
    from nbformat.v4 import new_output

    return new_output("display_data", data={"text/html": html_text, "text/plain": plain})


def html_exporter(show_code: bool = False):
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"dlm_offline.html.j2": OFFLINE_TEMPLATE})])
    exporter.template_file = "dlm_offline.html.j2"
    exporter.exclude_input = not show_code
    exporter.exclude_input_prompt = not show_code
    exporter.exclude_output_prompt = True
    exporter.embed_images = True
    return exporter


def external_references(page: str) -> list[str]:
    """Every place in an HTML page that would make a browser fetch something from the network."""
    return [page[max(0, m.start() - 20): m.end() + 60] for m in EXTERNAL.finditer(page)]


def export_html(executed: str | Path, page: str | Path | None = None, show_code: bool = False,
                title: str | None = None) -> Path:
    """One self-contained, offline HTML page of an executed notebook (code hidden by default)."""
    import nbformat

    executed = Path(executed)
    page = Path(page) if page else executed.with_suffix(".html")
    nb = lead_with_results(fold_long_streams(strip_widgets(nbformat.read(executed, as_version=4))))
    if not show_code:  # a code cell that printed nothing would only leave a gap (the parameters cells)
        nb.cells = [cell for cell in nb.cells if cell.get("cell_type") != "code" or cell.get("outputs")]
    if title:
        nb.metadata["title"] = title
    body, _ = html_exporter(show_code).from_notebook_node(nb, resources={"metadata": {"name": executed.stem},
                                                                         "dlm_css": PAGE_CSS})
    found = external_references(body)
    if found:
        raise ReportError(f"The page for {executed.name} would load from the network: {found[:3]}")
    atomic_write_bytes(page, body.encode("utf-8"))
    return page


# --- key numbers and the index ------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_seconds(metrics, invocations: list[dict]) -> float | None:
    """Seconds the run spent training, summed over its invocations: each one's clock (metrics.csv's
    elapsed_s) starts at zero, and provenance.json says where each resumed one began (its rows are
    the later steps). None when metrics.csv has no times."""
    times = metrics[["step", "elapsed_s"]].dropna()
    if not len(times):
        return None
    starts = sorted(int(i.get("from_step") or 0) for i in invocations if i.get("mode") == "resume")
    invocation = times["step"].map(lambda step: sum(start < step for start in starts))
    return float(times.groupby(invocation)["elapsed_s"].max().sum())


def trained_line(result, run_dir: str | Path) -> str:
    """What train.ipynb prints when training returns: steps, epochs and the run's training time
    from its metrics.csv and provenance.json, never this invocation's clock alone (which reads 0 s
    when a finished run is resumed to draw its pages)."""
    import pandas as pd

    run = RunDir(run_dir)
    invocations = read_provenance(run.provenance)
    seconds = training_seconds(pd.read_csv(run.metrics), invocations) if run.metrics.is_file() else None
    spent = f"{seconds:.1f}s of training" if seconds is not None else "an unrecorded time"
    last = invocations[-1] if invocations else {}
    resumed_at = int(last.get("from_step") or 0) if last.get("mode") == "resume" else None
    if resumed_at is not None and result.step == resumed_at:
        return (f"the run was already trained: {result.step} steps ({result.epoch} epochs) in {spent} "
                f"(metrics.csv) -> {run_dir}")
    if resumed_at is not None:
        return (f"resumed at step {resumed_at}, trained to {result.step} steps ({result.epoch} epochs) "
                f"in {spent} in all ({result.wall_s:.1f}s now) -> {run_dir}")
    return f"trained {result.step} steps ({result.epoch} epochs) in {spent} -> {run_dir}"


def notebook_parameters(executed: str | Path) -> dict[str, Any]:
    """The parameters an executed notebook ran with: the literal values its parameters cell assigns,
    then those papermill injected after it (what -p and --param gave). {} when it is not there."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except (OSError, ValueError):
        return {}
    values: dict[str, Any] = {}
    for cell in nb.cells:  # the injected cell follows the parameters cell: its values win
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell.get("cell_type") != "code" or not tags & {"parameters", "injected-parameters"}:
            continue
        try:
            body = ast.parse(cell.source).body
        except SyntaxError:
            continue
        for node in body:
            if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                continue
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    values[target.id] = value
    return values


def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


def run_numbers(run_dir: str | Path, report_dir: str | Path | None = None) -> dict:
    """The numbers the index shows, from what the notebooks left in the run folder and the settings
    they ran with (the teacher, how many windows and samples), read from their executed copies in
    `report_dir` (default: the run folder's parent, where dlm report keeps them)."""
    import pandas as pd

    run = RunDir(run_dir)
    report_dir = Path(report_dir) if report_dir is not None else run.path.parent
    numbers: dict[str, Any] = {}
    metrics = _read_csv(run.metrics)
    if metrics is not None and len(metrics):
        train = metrics[metrics["total"].notna()]
        val = metrics[metrics["val_total"].notna()] if "val_total" in metrics else metrics.iloc[0:0]
        numbers.update(steps=int(metrics["step"].max()), epochs=int(metrics["epoch"].max()),
                       train_s=training_seconds(metrics, read_provenance(run.provenance)))
        if len(train):
            numbers.update(train_loss=float(train["total"].iloc[-1]), embedding_norm=float(train["embedding_norm"].iloc[-1]),
                           nn_distance=float(train["nn_distance"].iloc[-1]))
        if len(val):
            last = val.iloc[-1]
            numbers.update(val_loss=float(last["val_total"]))
            # each other term of the run's family (val_mse, val_rounding; val_nelbo; ...)
            numbers.update({column: float(last[column]) for column in metrics.columns
                            if column.startswith("val_") and column != "val_total" and pd.notna(last[column])})
    summary = _read_json(run.sample_summary)
    if summary:
        for side in ("samples", "heldout"):
            stats = summary.get(side, {})
            for key in ("punctuation_share", "unigram_entropy", "types", "top10_share"):
                if key in stats:
                    numbers[f"{side}_{key}"] = stats[key]
    bounds = _read_csv(run.nll_bound)  # the bound at a few checkpoints, written by train.ipynb
    if bounds is not None and len(bounds):
        numbers.update(nll_bound=float(bounds["nll_bound"].iloc[-1]), nll_bound_se=float(bounds["nll_bound_se"].iloc[-1]),
                       nll_bound_step=int(bounds["step"].iloc[-1]))
    verdict = _read_json(run.verdict)
    if verdict:
        numbers.update(collapsed=verdict.get("collapsed"), collapse_began_epoch=verdict.get("began_epoch"),
                       collapse_signals=verdict.get("signals", ""), collapse_warnings=verdict.get("warnings", ""))
    config, vocab_size = _run_config(run)
    if config is not None:
        numbers.update(_family_numbers(config, numbers.get("steps")))
        numbers.update(_likelihood_numbers(config, vocab_size, numbers, notebook_parameters(report_dir / "train.ipynb")))
        numbers.update(_compute_numbers(config, vocab_size, numbers.get("steps"), read_provenance(run.provenance)))
    numbers.update(_quality_numbers(run, summary or {}, notebook_parameters(report_dir / "sample.ipynb")))
    return numbers


def _run_config(run: RunDir) -> tuple[Any, int | None]:
    """The run's Config (None when its config.yaml is missing or no longer loads) and vocabulary size."""
    from dlm.core.data import saved_tokenizer

    try:
        config = load_config(run.config)
        families.family(config.model)
    except (OSError, ValueError):  # a UserError is a ValueError
        return None, None
    try:
        vocab_size = len(saved_tokenizer(json.loads(run.vocab.read_text()), run.path))
    except (OSError, ValueError, KeyError):
        vocab_size = None
    return config, vocab_size


def _family_numbers(config, steps: int | None) -> dict[str, Any]:
    """The family (dlm.families) and the recipe in words: the family's own choices, then the shared ones."""
    module = families.family(config.model)
    shared = [f"{config.positions} positions"]
    if config.tokenizer != "word":
        shared.append(f"{config.tokenizer} tokens")
    if config.max_train_tokens:
        shared.append(f"the first {config.max_train_tokens:,} training tokens")
    if steps:
        shared.append(f"{steps:,} steps")
    return {"family": config.model, "family_title": module.TITLE,
            "recipe": ", ".join([*module.recipe(config), *shared])}


def _likelihood_numbers(config, vocab_size: int | None, numbers: Mapping[str, Any],
                        train_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The run's likelihood in nats per token and what kind of number it is: a family with an exact
    likelihood (the AR baseline) has its NLL as its validation loss; one with a bound (NELBO or
    bound), the bound train.ipynb wrote (analysis/nll_bound.csv) on its nll_windows held-out windows.
    uniform_nats: ln V, a uniform guess's NLL."""
    out: dict[str, Any] = {"likelihood_kind": families.family(config.model).likelihood_kind(config)}
    if vocab_size:
        out["uniform_nats"] = math.log(vocab_size)
    if families.supports(config.model, "likelihood_exact"):
        if "val_loss" in numbers:
            out.update(likelihood=numbers["val_loss"], likelihood_se=None, likelihood_on="the validation loss")
    elif "nll_bound" in numbers:
        windows, draws = train_parameters.get("nll_windows"), train_parameters.get("nll_draws")
        on = f"{windows} windows x {draws} draws, " if windows and draws else ""
        out.update(likelihood=numbers["nll_bound"], likelihood_se=numbers.get("nll_bound_se"),
                   likelihood_on=f"{on}step {numbers.get('nll_bound_step', '?')}")
    return out


def train_setting(invocations: list[dict], steps: int | None = None) -> str:
    """Device, precision and threads of the invocations that trained (provenance.json's entries; a
    resume that started at the last step, to draw a report's pages, trained nothing)."""
    said = []
    for invocation in invocations:
        if steps is not None and invocation.get("mode") == "resume" and int(invocation.get("from_step") or 0) >= steps:
            continue
        threads = (invocation.get("config") or {}).get("threads")
        text = " ".join(str(v) for v in (invocation.get("device"), invocation.get("precision")) if v)
        text += f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
        if text and text not in said:
            said.append(text)
    return "; ".join(said)


def _compute_numbers(config, vocab_size: int | None, steps: int | None, invocations: list[dict]) -> dict[str, Any]:
    """Training compute, about 6 FLOPs per parameter per token the network read (forward 2,
    backward 4; a self-conditioned batch one forward more), and how the run was trained."""
    out: dict[str, Any] = {}
    setting = train_setting(invocations, steps)
    if setting:
        out["train_setting"] = setting
    if not steps or not vocab_size:
        return out
    import torch

    try:
        with torch.device("meta"):  # the shapes alone: nothing is allocated or initialised
            model = families.family(config.model).new_model(config, vocab_size)
    except Exception:  # a family whose constructor needs real tensors: no count rather than no index
        return out
    parameters = sum(p.numel() for p in model.parameters())
    positions = config.seq_len * (2 if config.trains_every_block else 1)  # BD3-LM reads the clean window too
    tokens = steps * config.batch_size * positions
    out.update(parameters=parameters, train_tokens=tokens,
               train_flops=float((6 + 2 * config.self_condition) * parameters * tokens))
    return out


def _quality_numbers(run: RunDir, summary: Mapping[str, Any], sample_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Sample quality from the sample page's quality curve (samples/quality_vs_steps.csv) at the
    samples' own step count (else its longest chain): the AR teacher's perplexity and the unigram
    entropy of the same samples, held-out text's from its row, and samples per second from the
    curve's clock (curve_samples samples)."""
    import pandas as pd

    options = summary.get("options", {})
    out: dict[str, Any] = {}
    if "temperature" in options:
        out["sample_temperature"] = options["temperature"]
    curve = _read_csv(run.quality_vs_steps)
    if curve is None or "steps" not in curve:
        return out
    chains, heldout = curve[curve["steps"].notna()], curve[curve["steps"].isna()]
    if not len(chains):
        return out
    at_steps = chains[chains["steps"] == options.get("steps")]
    row = at_steps.iloc[-1] if len(at_steps) else chains.loc[chains["steps"].idxmax()]
    teacher = sample_parameters.get("teacher_dir")
    out.update(quality_steps=int(row["steps"]), quality_entropy=float(row["unigram_entropy"]),
               teacher=teacher if teacher is not None else "not recorded")
    if pd.notna(row.get("teacher_perplexity")):
        out["teacher_perplexity"] = float(row["teacher_perplexity"])
    count = sample_parameters.get("curve_samples")
    if count and row.get("seconds", 0) > 0:
        out.update(quality_samples=int(count), samples_per_s=float(count / row["seconds"]))
    if len(heldout):
        held = heldout.iloc[-1]
        out["heldout_quality_entropy"] = float(held["unigram_entropy"])
        if pd.notna(held.get("teacher_perplexity")):
            out["heldout_teacher_perplexity"] = float(held["teacher_perplexity"])
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _verdict_text(numbers: Mapping[str, Any]) -> str:
    if numbers.get("collapsed") is None:
        return "–"
    if numbers["collapsed"]:
        since = numbers.get("collapse_began_epoch")
        return f"collapsed since epoch {since} ({numbers.get('collapse_signals') or '?'})"
    warnings = numbers.get("collapse_warnings")
    return "not collapsed" + (f" (warnings: {warnings})" if warnings else "")


ENTROPY_TOLERANCE = 0.01  # samples within 1% of held-out text's entropy count as matched (dlm calibrate's default)
NOT_RECORDED = '<span class="muted">not recorded</span>'

INDEX_CSS = """
body {font-family: system-ui, sans-serif; margin: 1.5em; color: #222;}
p.intro {max-width: 75em; line-height: 1.4; margin: 0.4em 0 0.8em;}
.table-box {overflow-x: auto; max-width: 100%;}
table {border-collapse: collapse; font-size: 0.85em;}
th, td {border-bottom: 1px solid #ddd; padding: 0.35em 0.5em; text-align: left; vertical-align: top;}
th {background: #f4f4f4;}
td.words {min-width: 12em; max-width: 18em;}
td.num {text-align: right; font-variant-numeric: tabular-nums; max-width: 11em;}
td.verdict {min-width: 8em; max-width: 14em;}
.value {white-space: nowrap;}
tr.heldout td {background: #fafaf2;}
.failed {color: #b00020;}
.muted {color: #777; font-size: 0.92em;}
img.plot {max-width: 100%; height: auto;}
"""


def _muted(text: str) -> str:
    return f'<br><span class="muted">{html.escape(text)}</span>' if text else ""


def _value(text: str) -> str:
    return f'<span class="value">{html.escape(text)}</span>'


def _report_cell(name: str, report: Mapping[str, Any]) -> str:
    links = " · ".join(
        f'<a href="{html.escape(name)}/{html.escape(page)}">{html.escape(TITLES.get(nb, nb))}</a>'
        for nb, page in report.get("pages", {}).items()
    ) or '<span class="muted">no pages</span>'
    status = report.get("status", "?")
    if status == "failed":
        failure = report.get("failure", {})
        said = (f'<br><span class="failed">failed in {html.escape(str(failure.get("notebook", "?")))}.ipynb '
                f'cell {html.escape(str(failure.get("cell", "?")))}: '
                f'{html.escape(str(failure.get("error", ""))[:200])}</span>')
    else:
        said = "" if status == "complete" else _muted(status)
    return (f"<td><b>{html.escape(name)}</b><br>{links}{said}"
            f"{_muted(str(report.get('params', '')))}{_muted(str(report.get('created', '')))}</td>")


def _family_cell(numbers: Mapping[str, Any]) -> str:
    family = numbers.get("family")
    if family not in families.FAMILIES:
        return f"<td class=\"words\">{NOT_RECORDED}</td>"
    module = families.family(family)
    return (f'<td class="words"><b title="{html.escape(module.DESCRIPTION)}">{html.escape(module.TITLE)}</b>'
            f'{_muted(str(numbers.get("recipe", "")))}</td>')


def _likelihood_cell(numbers: Mapping[str, Any]) -> str:
    value = numbers.get("likelihood", numbers.get("nll_bound"))
    if value is None:
        return f'<td class="num">{NOT_RECORDED}</td>'
    se = numbers.get("likelihood_se", numbers.get("nll_bound_se"))
    text = f"{value:.2f}" + (f" ± {se:.2f}" if se is not None else "")
    kind = numbers.get("likelihood_kind", "kind not recorded")
    uniform = numbers.get("uniform_nats")
    loose = (f"above ln V = {uniform:.2f}, a uniform guess's: a loose bound" if uniform is not None and value > uniform
             else "")
    return (f'<td class="num">{_value(text)}{_muted(kind)}{_muted(numbers.get("likelihood_on", ""))}'
            f'{_muted(loose)}</td>')


def _entropy_note(numbers: Mapping[str, Any]) -> str:
    mine, held = numbers.get("quality_entropy"), numbers.get("heldout_quality_entropy")
    if mine is None or not held:
        return ""
    off = mine / held - 1
    return "at held-out entropy" if abs(off) <= ENTROPY_TOLERANCE else f"not at held-out entropy ({off:+.0%})"


def _quality_cells(numbers: Mapping[str, Any]) -> str:
    """Teacher perplexity (x held-out text's) and the entropy it was measured at, beside held-out's."""
    if numbers.get("quality_entropy") is None:
        family = numbers.get("family")
        why = (families.not_available(family, "The quality-against-steps curve")
               if family in families.FAMILIES and "steps" not in families.family(family).SAMPLE_OPTIONS
               else "not recorded (no quality curve in samples/quality_vs_steps.csv)")
        mine, held = numbers.get("samples_unigram_entropy"), numbers.get("heldout_unigram_entropy")
        entropy = (f'{_value(_fmt(mine, 2) + " / " + _fmt(held, 2))}{_muted("summary.json, no teacher score")}'
                   if mine is not None else NOT_RECORDED)
        return f'<td class="num"><span class="muted">{html.escape(why)}</span></td><td class="num">{entropy}</td>'
    perplexity, held = numbers.get("teacher_perplexity"), numbers.get("heldout_teacher_perplexity")
    teacher = numbers.get("teacher")
    if perplexity is None:
        quality = "no teacher" if teacher == "" else "not scored"
        quality = f'<span class="muted">{quality}</span>{_muted("sample.ipynb ran without teacher_dir" if teacher == "" else "")}'
    else:
        ratio = f"{perplexity / held:.2f}x held-out" if held else ""
        quality = f"{_value(_fmt(perplexity, 1))}{_muted(ratio)}{_muted(f'teacher {teacher}')}"
    temperature = numbers.get("sample_temperature")
    how = ", ".join(part for part in (
        f"temperature {temperature:g}" if temperature is not None else "",
        f"{numbers['quality_steps']} steps",
        f"{numbers['quality_samples']} samples" if numbers.get("quality_samples") else "") if part)
    entropy = (f'{_value(_fmt(numbers["quality_entropy"], 2) + " / " + _fmt(numbers.get("heldout_quality_entropy"), 2))}'
               f'{_muted(_entropy_note(numbers))}{_muted(how)}')
    return f'<td class="num">{quality}</td><td class="num">{entropy}</td>'


def _training_cells(numbers: Mapping[str, Any]) -> str:
    seconds, flops = numbers.get("train_s"), numbers.get("train_flops")
    time_text = _value(f"{seconds:,.0f} s") if seconds is not None else NOT_RECORDED
    compute = f"{flops:.2g} FLOPs" if flops else ""
    training = f'<td class="num">{time_text}{_muted(numbers.get("train_setting", ""))}{_muted(compute)}</td>'
    rate = numbers.get("samples_per_s")
    measured = f"{numbers.get('quality_samples')} at {numbers.get('quality_steps')} steps"
    speed = f"{_value(f'{rate:.2f}')}{_muted(measured)}" if rate is not None else NOT_RECORDED
    return training + f'<td class="num">{speed}</td>'


def _verdict_cell(report: Mapping[str, Any], numbers: Mapping[str, Any]) -> str:
    """The collapse verdict, or why the report has none."""
    if numbers.get("collapsed") is not None:
        return f'<td class="verdict">{html.escape(_verdict_text(numbers))}</td>'
    family, status = numbers.get("family"), report.get("status")
    if "collapse_analysis" in report.get("not_available", {}):
        why = report["not_available"]["collapse_analysis"]
    elif family in families.FAMILIES and not families.supports(family, PAGE_NEEDS["collapse_analysis"]):
        why = families.not_available(family, "The collapse analysis page")
    elif status == "failed":
        why = "the report failed before its collapse analysis wrote one."
    elif status != "complete":
        why = f"not yet ({status})."
    else:
        why = "its collapse analysis wrote none (no run/analysis/verdict.json)."
    return f'<td class="verdict"><span class="muted">no verdict: {html.escape(why[:1].lower() + why[1:])}</span></td>'


def _heldout_row(entries: list[tuple[str, dict, dict]]) -> str:
    """Held-out text's own row: the teacher's perplexity of held-out windows and their entropy, as
    each report's quality curve measured them (a range where their windows or teachers differ)."""
    def spread(key: str, digits: int, why: str) -> str:
        values = sorted({round(n[key], digits) for _, _, n in entries if n.get(key) is not None})
        if not values:
            return "–"
        low, high = _fmt(float(values[0]), digits), _fmt(float(values[-1]), digits)
        return low if low == high else f"{_value(f'{low}–{high}')}{_muted(f'by report: {why}')}"

    return ('<tr class="heldout"><td><b>held-out text</b><span class="muted"><br>the corpus\'s validation '
            'split</span></td><td class="words"><span class="muted">windows of the samples\' shape</span></td>'
            '<td class="num">–</td>'
            f'<td class="num">{spread("heldout_teacher_perplexity", 1, "their windows and teachers")}</td>'
            f'<td class="num">{spread("heldout_quality_entropy", 2, "as many windows as samples")}</td>'
            '<td class="num">–</td><td class="num">–</td><td class="verdict">–</td></tr>')


def _png(figure) -> str:
    """A figure as an embedded PNG's base64 (the index loads nothing)."""
    import base64
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _quality_plot(entries: list[tuple[str, dict, dict]]) -> str:
    """The figure of quality against training compute, an embedded PNG, where at least two reports
    have both; else ''."""
    import pandas as pd

    from dlm.workbench import plots

    rows = [{"name": name, "family": numbers.get("family_title", numbers.get("family", "?")),
             "train_flops": numbers["train_flops"], "teacher_perplexity": numbers["teacher_perplexity"],
             "matched": _entropy_note(numbers) == "at held-out entropy", "samples_per_s": numbers.get("samples_per_s")}
            for name, _, numbers in entries if numbers.get("train_flops") and numbers.get("teacher_perplexity")]
    if len(rows) < 2:
        return ""
    helds = [n["heldout_teacher_perplexity"] for _, _, n in entries if n.get("heldout_teacher_perplexity")]
    figure = plots.quality_against_compute(pd.DataFrame(rows), float(pd.Series(helds).median()) if helds else None)
    return ('<h2>Sample quality against training compute</h2><p class="intro">Each report with a teacher\'s score '
            'and a training-compute estimate. Lower reads more like text to the teacher; a hollow marker is a report '
            'whose samples are not at held-out entropy (the table says how far), which moves perplexity by itself.</p>'
            f'<img class="plot" alt="teacher perplexity of samples against training compute" '
            f'src="data:image/png;base64,{_png(figure)}">')



def _speed_section(reports_dir: Path) -> str:
    """Quality against sampling cost (benchmarks/pareto.py --index REPORTS put pareto.csv here): its
    figure and table, the rows on a frontier in bold; '' without one (or with one that does not read)."""
    import pandas as pd

    from dlm.workbench import plots

    path = reports_dir / "pareto.csv"
    try:
        table = pd.read_csv(path)
        figure = plots.quality_against_speed(table, float(table["heldout_ppl"].iloc[0]))
    except (OSError, ValueError, KeyError, IndexError, pd.errors.ParserError):
        return ""
    on_front = table[[c for c in table if c.startswith("frontier_")]].any(axis=1)
    body = "".join(
        f"<tr><td>{'<b>' if front else ''}{html.escape(str(r['row']))}{'</b>' if front else ''}</td>"
        f"<td>{html.escape(str(r['setting']))}</td>"
        f"<td class='num'>{r['teacher_ppl']:,.1f} <span class='muted'>({r['ppl_min']:,.1f}–{r['ppl_max']:,.1f})"
        f"</span></td><td class='num'>{r['entropy']:.2f}</td><td class='num'>{r['cpu_s_per_sample']:.3f}</td>"
        f"<td class='num'>{r['batch1_s']:.2f}</td></tr>" for (_, r), front in zip(table.iterrows(), on_front))
    return ('<h2>Sample quality against sampling cost</h2><p class="intro">Each family and sampler setting '
            '(benchmarks/pareto.py; results in benchmarks/results/pareto.md): the teacher\'s perplexity of its '
            f'samples at held-out entropy (seeds\' range beside; held-out text: {table["heldout_ppl"].iloc[0]:.1f}), '
            'against the CPU time of a sample in a batch of 64 and the wall time of one sample alone. Bold: on a '
            'frontier (nothing cheaper is better). The AR row scores its own samples, a floor.</p>'
            '<div class="table-box"><table><tr><th>row</th><th>sampler setting</th><th>teacher perplexity</th>'
            '<th>entropy<br><span class="muted">bits</span></th><th>CPU s / sample<br><span class="muted">batch '
            '64</span></th><th>s for one sample<br><span class="muted">batch 1</span></th></tr>'
            f'{body}</table></div><img class="plot" alt="teacher perplexity against sampling cost" '
            f'src="data:image/png;base64,{_png(figure)}">')


INTRO = ('<p class="intro">The reports side by side, newest first, each made by <code>dlm report PARAMS.yaml --name '
         'NAME</code>; held-out text\'s own row first. How to read each column is under the table.</p>')


def reading_notes() -> str:
    """What the index's columns are; which families have which pages, from dlm.families."""
    without = [families.family(f).TITLE for f in families.FAMILIES if not families.supports(f, PAGE_NEEDS["collapse_analysis"])]
    return (
        '<h2>Reading the columns</h2><p class="intro">Each report ran notebooks/train.ipynb and sample.ipynb on its '
        "preset, then the pages its family has: the collapse analysis (which gives the verdict; not for the "
        f"{' and '.join(without)} families), and control where the preset names control tasks. "
        "<b>Likelihood</b>: nats per token on held-out windows; <i>exact NLL</i> is the chain rule's, "
        "<i>NELBO</i> and <i>bound</i> are upper bounds on it (lower is better; a Gaussian bound is of the chain "
        "toward the sampler's x0, and the predicted x0's is loose). <b>Teacher perplexity</b>: the AR teacher's "
        "perplexity of the samples (lower reads more like text to it), beside held-out text's; it compares only at "
        "equal unigram entropy, given next to it (<code>dlm calibrate</code> finds the temperature that puts a run's "
        "samples at held-out entropy). <b>Training</b>: the run's own training time (metrics.csv), not the time the "
        "notebooks took, and its compute, about 6 FLOPs per parameter per token read. <b>Samples/s</b>: the sample "
        "page's quality curve at the samples' step count, timed on the machine and under the load that made the "
        "report.</p>"
    )


def write_index(reports_dir: str | Path) -> Path:
    """reports/index.html: the reports side by side, newest first: family and recipe, likelihood
    and its kind, sample quality at its entropy beside held-out text's, training time and compute,
    sampling speed and the verdict (or why there is none), with links to each report's pages and a
    figure of quality against compute. Numbers a report.json lacks (one written before they were
    recorded) are read from its run folder. Plain HTML, CSS and embedded PNG: nothing to load."""
    reports_dir = Path(reports_dir)
    entries = []
    for path in sorted(reports_dir.glob("*/report.json")):
        report = _read_json(path)
        if report is not None:
            found = run_numbers(path.parent / "run", path.parent) if (path.parent / "run").is_dir() else {}
            numbers = {**found, **report.get("numbers", {})}
            invocations = (report.get("provenance") or {}).get("run")
            if "train_setting" not in numbers and isinstance(invocations, list):  # a run folder without provenance.json
                numbers["train_setting"] = train_setting(invocations, numbers.get("steps"))
            entries.append((path.parent.name, report, numbers))
    entries.sort(key=lambda e: e[1].get("created", ""), reverse=True)
    rows = [("<tr>" + _report_cell(name, report) + _family_cell(numbers) + _likelihood_cell(numbers)
             + _quality_cells(numbers) + _training_cells(numbers) + _verdict_cell(report, numbers) + "</tr>")
            for name, report, numbers in entries]
    header = ("<tr><th>report</th><th>family and recipe</th><th>likelihood<br><span class='muted'>nats/token, its "
              "kind</span></th><th>teacher perplexity<br><span class='muted'>of samples</span></th>"
              "<th>unigram entropy<br><span class='muted'>bits: samples / held-out</span></th>"
              "<th>training<br><span class='muted'>its own time, compute</span></th><th>samples/s</th>"
              "<th>verdict</th></tr>")
    body = (_heldout_row(entries) + "\n" + "\n".join(rows) if rows
            else '<tr><td colspan="8" class="muted">No reports yet.</td></tr>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>dlm reports</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{INDEX_CSS}</style></head><body><h1>dlm reports</h1>{INTRO}"
        f'<div class="table-box"><table>\n{header}\n{body}\n</table></div>{reading_notes()}{_quality_plot(entries)}'
        f'{_speed_section(reports_dir)}'
        "</body></html>\n"
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    index = reports_dir / "index.html"
    atomic_write_bytes(index, page.encode("utf-8"))
    return index


# --- the whole chain ------------------------------------------------------------------------------

def _write_report_json(report_dir: Path, report: dict) -> None:
    atomic_write_bytes(report_dir / "report.json", json.dumps(report, indent=2, default=str).encode())


def is_report(folder: Path) -> bool:
    """A folder that `dlm report` wrote: its report.json holds the record build_report keeps."""
    try:
        record = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"name", "params", "status", "pages"} <= record.keys()


def check_report_destination(report_dir: Path, overwrite: bool, from_run: str | Path | None) -> bool:
    """Before anything is written or deleted: True when `report_dir` holds a report that --overwrite
    replaces. Only a report is ever deleted (never a training run or other files under that name),
    never the --from_run it is asked to copy, and a report is never written inside its own --from_run."""
    if report_dir.exists() and not report_dir.is_dir():
        raise ReportError(f"'{report_dir}' is a file, not a report folder: choose another --name or --reports_dir.")
    if from_run is not None:
        source, target = Path(from_run).resolve(), report_dir.resolve()
        if target.is_relative_to(source):
            raise ReportError(f"The report folder '{report_dir}' lies inside --from_run '{from_run}': the copy of the "
                              f"run would copy itself. Give a --reports_dir outside the run folder.")
        if overwrite and source.is_relative_to(target):
            raise ReportError(f"--from_run '{from_run}' lies inside '{report_dir}', which --overwrite deletes first: "
                              f"move the run out (e.g. mv {from_run} runs/{report_dir.name}) and give that as --from_run.")
    if not report_dir.exists() or not any(report_dir.iterdir()):
        return False
    if not is_report(report_dir):
        raise ReportError(f"'{report_dir}' is not a report (no report.json of dlm report; it holds "
                          f"{listing(folder_entries(report_dir))}): dlm "
                          f"report never deletes it, --overwrite or not. Choose another --name or --reports_dir.")
    if not overwrite:
        raise ReportExistsError(f"'{report_dir}' already holds a report. Pass --overwrite to replace it, "
                                f"or --name to write another.")
    return True


def _record_interrupt(report: dict, report_dir: Path, notebook: str, started: float, began: float) -> None:
    """report.json and the index after a Ctrl-C in `notebook`: status interrupted, with what was done."""
    report.update(status="interrupted", interrupted=notebook, wall_s=round(time.perf_counter() - started, 1),
                  numbers=run_numbers(report_dir / "run"))
    report["notebook_s"][notebook] = round(time.perf_counter() - began, 1)
    report["provenance"]["run"] = read_provenance(RunDir(report_dir / "run").provenance)
    _write_report_json(report_dir, report)
    write_index(reports_dir=report_dir.parent)


def _link_checkpoints_copy_the_rest(source: str, target: str) -> None:
    """Checkpoints (hundreds of MB) are hard-linked where the file system allows: they are only
    ever replaced atomically (a new inode), never written in place. Everything else (metrics.csv
    is appended to, sample files are rewritten) is copied, so the source run never changes."""
    if source.endswith(".pt"):
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


@dataclass
class ReportPlan:
    """A report checked before anything is written: the preset and the config its train notebook
    trains (with --param train.KEY overrides), the notebook parameters given, and the shipped code
    each notebook runs (its digest, recorded in report.json)."""
    params: Path
    name: str
    config: Any  # dlm.core.config.Config
    extra: dict[str, dict[str, Any]]
    ran: dict[str, str]
    from_run: str | Path | None = None

    def pages(self) -> tuple[list[str], dict[str, str]]:
        """The notebooks the report runs, and for each page the run's family cannot show, the
        line saying so (the report leaves it out)."""
        config = self.config
        notebooks = [nb for nb in NOTEBOOKS if nb != "control" or config.control_tasks]
        not_available = {nb: families.not_available(config.model, f"The {TITLES[nb]} page", PAGE_NEEDS[nb])
                         for nb in notebooks if nb in PAGE_NEEDS and not families.supports(config.model, PAGE_NEEDS[nb])}
        return [nb for nb in notebooks if nb not in not_available], not_available


def plan_report(params: str | Path, name: str | None = None,
                parameters: Mapping[str, Mapping[str, Any]] | None = None,
                from_run: str | Path | None = None) -> ReportPlan:
    """Every check a report makes before it writes anything (ReportError): the run to start from,
    the preset, the name, the notebook parameters, the notebooks as shipped, the family's keys and
    sampler options."""
    params = Path(params)
    if from_run is not None and not RunDir(from_run).last_checkpoint.is_file():
        raise ReportError(f"--from_run '{from_run}' holds no trained run (no checkpoints/last.pt); train it with dlm train.")
    config = load_config(params)  # a bad preset fails here, before any kernel starts
    name = name or params.stem
    if not NAME_PATTERN.match(name):
        raise ReportError(f"Report name '{name}' must be letters, digits, '.', '_' or '-' (it names a folder).")
    extra = {k: dict(v) for k, v in (parameters or {}).items()}
    unknown = set(extra) - set(NOTEBOOKS)
    if unknown:
        raise ReportError(f"Unknown notebook(s) in parameters: {', '.join(sorted(unknown))}; use {', '.join(NOTEBOOKS)}.")
    source = notebooks_dir()
    check_notebook_parameters(extra, source)
    ran = {}  # the code each notebook of the chain runs: the shipped code, recorded in report.json
    for notebook in NOTEBOOKS:
        try:
            check_as_shipped(source / f"{notebook}.ipynb")
        except EditedNotebook as edited:
            raise ReportError(str(edited)) from None
        ran[notebook] = digest(source / f"{notebook}.ipynb")
    # the pages follow what the train notebook trains: the preset with its --param train.KEY overrides
    config = load_config(params, **config_overrides(extra.get("train", {})))
    families.check_config(config)  # a key the family does not read: before the first notebook
    for notebook, keys in SAMPLER_PARAMETERS.items():
        for key, (option, unset) in keys.items():
            value = extra.get(notebook, {}).get(key, unset)
            if value is not None and value != unset:
                families.check_sample_options(config.model, {option: value},
                                              flag=lambda _, given=f"--param {notebook}.{key}": given)
    check_report_values(config, extra, from_run)
    return ReportPlan(params, name, config, extra, ran, from_run)


def build_report(params: str | Path, name: str | None = None, reports_dir: str | Path = "reports", *,
                 show_code: bool = False, overwrite: bool = False,
                 parameters: Mapping[str, Mapping[str, Any]] | None = None,
                 kernel_name: str | None = None, from_run: str | Path | None = None, echo: bool = True) -> Path:
    """Run the notebooks on the preset `params` into REPORTS_DIR/NAME/ and export them: train,
    sample, collapse_analysis, and control when the preset, or a --param train.control_tasks over it,
    names control tasks.

    `parameters` adds notebook parameters per notebook, e.g. {"sample": {"num_samples": 8}}.
    `from_run` starts the report from a run already trained on that preset (it is linked into
    NAME/run and the train notebook resumes it: nothing left to train, only its pages to draw).
    `echo` streams what each notebook prints (training log lines with ETA) to the terminal.
    Returns the report folder; raises NotebookFailed when a notebook fails.
    """
    plan = plan_report(params, name, parameters, from_run)
    reports_dir = Path(reports_dir)
    report_dir = reports_dir / plan.name
    check_report_destination(report_dir, overwrite, from_run)  # refused before even the lock file is made
    with report_lock(report_dir):  # before --overwrite deletes anything: one writer per report
        if check_report_destination(report_dir, overwrite, from_run):
            shutil.rmtree(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        # marked as a report at once: a later --overwrite may replace it even if the copy below fails
        _write_report_json(report_dir, {"name": plan.name, "params": str(plan.params), "status": "starting",
                                        "pages": {}, "created": datetime.datetime.now().isoformat(timespec="seconds")})
        if from_run is not None:
            shutil.copytree(from_run, report_dir / "run", copy_function=_link_checkpoints_copy_the_rest)
        chain = ReportChain(plan=plan, report_dir=report_dir, show_code=show_code, kernel_name=kernel_name, echo=echo)
        return chain.run()


@dataclass(kw_only=True)
class ReportChain:
    """One report's notebooks run in turn into its folder, report.json kept up to date as they go."""
    plan: ReportPlan
    report_dir: Path
    show_code: bool = False
    kernel_name: str | None = None
    echo: bool = True
    # the kernels start here, so relative paths inside the preset mean what they do for dlm train
    cwd: Path = field(default_factory=Path.cwd)
    report: dict[str, Any] = field(default_factory=dict, init=False)  # report.json as it stands
    started: float = field(default=0.0, init=False)  # when the first notebook started

    def parameters(self, notebook: str) -> dict[str, Any]:
        """What the chain gives `notebook` (the report's own copy of the run), then its --param."""
        plan = self.plan
        run_dir = path_for_kernel(self.report_dir / "run", self.cwd)
        chain = {
            "train": {"params": path_for_kernel(plan.params, self.cwd), "run_dir": run_dir,
                      **({"resume": True} if plan.from_run else {})},
            "sample": {"run_dir": run_dir, "overwrite": True},  # the report's own copy of the run
            "collapse_analysis": {"run_dir": run_dir},
            "control": {"run_dir": run_dir, "task": plan.config.control_tasks},
        }
        return {**chain[notebook], **plan.extra.get(notebook, {})}

    def run(self) -> Path:
        """Every page in turn; the report folder, or NotebookFailed, ChainFailed, ReportInterrupted."""
        plan = self.plan
        # a page whose analyses the run's family lacks is left out, and the report says so
        notebooks, not_available = plan.pages()
        self.report = {"name": plan.name, "params": str(plan.params), "status": "running",
                       "created": datetime.datetime.now().isoformat(timespec="seconds"),
                       "pages": {}, "notebook_s": {}, "numbers": {}, "not_available": not_available,
                       "notebooks": plan.ran,
                       "provenance": {**environment(), "run": []}}
        for line in not_available.values():
            logger.info("%s", line)
        self.started = time.perf_counter()
        for notebook in notebooks:
            self.run_notebook(notebook)
        report = self.report
        report.update(status="complete", wall_s=round(time.perf_counter() - self.started, 1),
                      numbers=run_numbers(self.report_dir / "run"))
        # where the code came from (at report start) and each training invocation's resolved settings
        report["provenance"]["run"] = read_provenance(RunDir(self.report_dir / "run").provenance)
        _write_report_json(self.report_dir, report)
        index = write_index(self.report_dir.parent)
        logger.info("report %s complete in %.0fs -> %s (index: %s)", plan.name, report["wall_s"], self.report_dir, index)
        return self.report_dir

    def run_notebook(self, notebook: str) -> None:
        """Execute one notebook into the report folder and export its page."""
        report, report_dir = self.report, self.report_dir
        executed = report_dir / f"{notebook}.ipynb"
        report["status"] = f"running {notebook}"
        _write_report_json(report_dir, report)
        logger.info("%s.ipynb: running -> %s", notebook, executed)
        began = time.perf_counter()
        try:
            execute(path_for_kernel(notebooks_dir() / f"{notebook}.ipynb", self.cwd), executed,
                    self.parameters(notebook), cwd=self.cwd, kernel_name=self.kernel_name, echo=self.echo)
        except KeyboardInterrupt:
            stop_kernels()
            _record_interrupt(report, report_dir, notebook, self.started, began)
            raise ReportInterrupted(f"interrupted in {notebook}.ipynb: what the report wrote is kept in "
                                    f"{report_dir} (report.json says 'interrupted'); --overwrite starts it "
                                    f"again.") from None
        except Exception as error:
            raise self.failed(notebook, error, began) from error
        page = export_html(executed, show_code=self.show_code, title=f"{self.plan.name}: {TITLES[notebook]}")
        report["pages"][notebook] = page.name
        report["notebook_s"][notebook] = round(time.perf_counter() - began, 1)
        logger.info("%s.ipynb: done in %.0fs -> %s", notebook, report["notebook_s"][notebook], page)

    def failed(self, notebook: str, error: Exception, began: float) -> ChainFailed:
        """report.json and the index after `notebook` failed (its page exported when papermill ran
        it), and the error to raise."""
        from papermill.exceptions import PapermillExecutionError

        report, report_dir = self.report, self.report_dir
        executed = report_dir / f"{notebook}.ipynb"
        page = None
        if isinstance(error, PapermillExecutionError) and executed.is_file():
            page = export_html(executed, show_code=self.show_code, title=f"{self.plan.name}: {TITLES[notebook]} (failed)")
            report["pages"][notebook] = page.name
        if isinstance(error, PapermillExecutionError):
            failure = NotebookFailed(notebook, error, executed, page, report_dir)
            summary = failure.summary()
        else:  # the kernel died or could not start, a cell timed out, ...
            failure = ChainFailed(f"{notebook}.ipynb could not run: {type(error).__name__}: {error}. "
                                  f"What earlier steps wrote is kept in {report_dir}.")
            summary = {"notebook": notebook, "cell": None, "error": f"{type(error).__name__}: {error}"}
        report.update(status="failed", failure=summary, wall_s=round(time.perf_counter() - self.started, 1),
                      numbers=run_numbers(report_dir / "run"))
        report["provenance"]["run"] = read_provenance(RunDir(report_dir / "run").provenance)
        report["notebook_s"][notebook] = round(time.perf_counter() - began, 1)
        _write_report_json(report_dir, report)
        write_index(report_dir.parent)
        return failure


def report_size(report_dir: str | Path, include_checkpoints: bool = True) -> int:
    """Bytes under a report folder (optionally leaving out the run's checkpoints)."""
    total = 0
    checkpoints = RunDir(Path(report_dir) / "run").checkpoints
    for path in Path(report_dir).rglob("*"):
        if path.is_file() and (include_checkpoints or not path.is_relative_to(checkpoints)):
            total += path.stat().st_size
    return total
