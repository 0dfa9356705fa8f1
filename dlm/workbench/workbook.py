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

import contextlib
import datetime
import html
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlm import families
from dlm.core.config import did_you_mean, field_types, load_config
from dlm.core.data import atomic_write_bytes
from dlm.core.lockfile import FolderLock, FolderLocked
from dlm.runs.provenance import environment, read_provenance
from dlm.runs.rundir import RunDir
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
               "spacing": ("spacing", ""), "record_every": ("record_every", 0)},
    "control": {"steps": ("steps", -1)},
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


class NotebookFailed(ReportError):
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


def kernel_manager_class():
    """nbclient's kernel manager, talking to the kernel over local IPC sockets rather than TCP
    (ipykernel warns on every TCP start that its traffic is unencrypted, and `dlm report` would echo
    that warning once per notebook). Windows has no IPC transport: TCP there."""
    from jupyter_client.manager import AsyncKernelManager

    if os.name == "nt":
        return AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"

    return IPCKernelManager


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


def run_numbers(run_dir: str | Path) -> dict:
    """The numbers the index shows, from what the notebooks left in the run folder."""
    import pandas as pd

    run = RunDir(run_dir)
    numbers: dict[str, Any] = {}
    if run.metrics.is_file():
        metrics = pd.read_csv(run.metrics)
        train = metrics[metrics["total"].notna()]
        val = metrics[metrics["val_total"].notna()]
        if len(metrics):
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
    if run.nll_bound.is_file():  # the last checkpoint's bound, written by train.ipynb
        bounds = pd.read_csv(run.nll_bound)
        if len(bounds):
            numbers.update(nll_bound=float(bounds["nll_bound"].iloc[-1]), nll_bound_se=float(bounds["nll_bound_se"].iloc[-1]))
    verdict = _read_json(run.verdict)
    if verdict:
        numbers.update(collapsed=verdict.get("collapsed"), collapse_began_epoch=verdict.get("began_epoch"),
                       collapse_signals=verdict.get("signals", ""), collapse_warnings=verdict.get("warnings", ""))
    return numbers


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _verdict_text(numbers: Mapping[str, Any]) -> str:
    if numbers.get("collapsed") is None:
        return "–"
    if numbers["collapsed"]:
        since = numbers.get("collapse_began_epoch")
        return f"collapsed since epoch {since} ({numbers.get('collapse_signals') or '?'})"
    warnings = numbers.get("collapse_warnings")
    return "not collapsed" + (f" (warnings: {warnings})" if warnings else "")


INDEX_CSS = """
body {font-family: system-ui, sans-serif; margin: 2em; color: #222;}
table {border-collapse: collapse; font-size: 0.92em;}
th, td {border-bottom: 1px solid #ddd; padding: 0.4em 0.7em; text-align: left; vertical-align: top;}
th {background: #f4f4f4;}
td.num {text-align: right; font-variant-numeric: tabular-nums;}
.failed {color: #b00020;}
.muted {color: #777;}
"""


def write_index(reports_dir: str | Path) -> Path:
    """reports/index.html: every report folder with a report.json, newest first, with its key
    numbers and links to its pages. Plain HTML and CSS: nothing to load."""
    reports_dir = Path(reports_dir)
    entries = []
    for path in sorted(reports_dir.glob("*/report.json")):
        report = _read_json(path)
        if report is not None:
            entries.append((path.parent.name, report))
    entries.sort(key=lambda e: e[1].get("created", ""), reverse=True)
    rows = []
    for name, report in entries:
        numbers = report.get("numbers", {})
        status = report.get("status", "?")
        if status == "failed":
            failure = report.get("failure", {})
            status_html = (f'<span class="failed">failed in {html.escape(str(failure.get("notebook", "?")))}.ipynb '
                           f'cell {html.escape(str(failure.get("cell", "?")))}: '
                           f'{html.escape(str(failure.get("error", ""))[:200])}</span>')
        else:
            status_html = html.escape(status)
        links = " · ".join(
            f'<a href="{html.escape(name)}/{html.escape(page)}">{html.escape(TITLES.get(nb, nb))}</a>'
            for nb, page in report.get("pages", {}).items()
        ) or '<span class="muted">no pages</span>'
        punct = f'{_fmt(numbers.get("samples_punctuation_share"))} / {_fmt(numbers.get("heldout_punctuation_share"))}'
        entropy = f'{_fmt(numbers.get("samples_unigram_entropy"), 2)} / {_fmt(numbers.get("heldout_unigram_entropy"), 2)}'
        types = f'{_fmt(numbers.get("samples_types"))} / {_fmt(numbers.get("heldout_types"))}'
        cells = [
            f"<td><b>{html.escape(name)}</b><br>{links}</td>",
            f"<td>{html.escape(_verdict_text(numbers))}</td>",
            f"<td>{status_html}<br><span class=\"muted\">{html.escape(report.get('created', ''))}</span></td>",
            f"<td>{html.escape(str(report.get('params', '')))}</td>",
            f'<td class="num">{_fmt(numbers.get("steps"))} / {_fmt(numbers.get("epochs"))}</td>',
            f'<td class="num">{_fmt(report.get("wall_s"), 0)}<br><span class="muted">'
            f'{html.escape(" / ".join(_fmt(report.get("notebook_s", {}).get(nb), 0) for nb in NOTEBOOKS))}</span></td>',
            f'<td class="num">{_fmt(numbers.get("train_loss"))} / {_fmt(numbers.get("val_loss"))}</td>',
            f'<td class="num">{_fmt(numbers.get("nll_bound"), 2)}<br><span class="muted">+- '
            f'{_fmt(numbers.get("nll_bound_se"), 2)}</span></td>',
            f'<td class="num">{punct}</td>', f'<td class="num">{entropy}</td>', f'<td class="num">{types}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = ("<tr><th>report</th><th>verdict</th><th>status</th><th>preset</th><th>steps / epochs</th>"
              "<th>wall time (s)<br><span class='muted'>train / sample / analysis / control</span></th>"
              "<th>loss: train / val</th><th>NLL bound<br><span class='muted'>nats/token</span></th>"
              "<th>punctuation: samples / held-out</th>"
              "<th>entropy (bits): samples / held-out</th><th>types: samples / held-out</th></tr>")
    body = "\n".join(rows) if rows else '<tr><td colspan="11" class="muted">No reports yet.</td></tr>'
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>dlm reports</title>'
        f"<style>{INDEX_CSS}</style></head><body><h1>dlm reports</h1>"
        "<p>Each report ran notebooks/train.ipynb, sample.ipynb and collapse_analysis.ipynb on one preset "
        "(<code>dlm report PARAMS.yaml --name NAME</code>). Samples and held-out text are compared at the same "
        "shape; the verdict thresholds are in dlm/evaluation/collapse.py.</p>"
        f"<table>\n{header}\n{body}\n</table></body></html>\n"
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
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in report_dir.iterdir())
        listing = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise ReportError(f"'{report_dir}' is not a report (no report.json of dlm report; it holds {listing}): dlm "
                          f"report never deletes it, --overwrite or not. Choose another --name or --reports_dir.")
    if not overwrite:
        raise ReportExistsError(f"'{report_dir}' already holds a report. Pass --overwrite to replace it, "
                                f"or --name to write another.")
    return True


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


def build_report(params: str | Path, name: str | None = None, reports_dir: str | Path = "reports",
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
    reports_dir = Path(reports_dir)
    report_dir = reports_dir / name
    check_report_destination(report_dir, overwrite, from_run)  # refused before even the lock file is made
    with report_lock(report_dir):  # before --overwrite deletes anything: one writer per report
        if check_report_destination(report_dir, overwrite, from_run):
            shutil.rmtree(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        # marked as a report at once: a later --overwrite may replace it even if the copy below fails
        _write_report_json(report_dir, {"name": name, "params": str(params), "status": "starting", "pages": {},
                                        "created": datetime.datetime.now().isoformat(timespec="seconds")})
        if from_run is not None:
            shutil.copytree(from_run, report_dir / "run", copy_function=_link_checkpoints_copy_the_rest)
        cwd = Path.cwd()  # the kernels start here, so relative paths inside the preset mean what they do for dlm train
        run_dir = path_for_kernel(report_dir / "run", cwd)
        chain = {
            "train": {"params": path_for_kernel(params, cwd), "run_dir": run_dir, **({"resume": True} if from_run else {})},
            "sample": {"run_dir": run_dir, "overwrite": True},  # the report's own copy of the run
            "collapse_analysis": {"run_dir": run_dir},
            "control": {"run_dir": run_dir, "task": config.control_tasks},
        }
        notebooks = [nb for nb in NOTEBOOKS if nb != "control" or config.control_tasks]
        # a page whose analyses the run's family lacks is left out, and the report says so
        not_available = {nb: families.not_available(config.model, f"The {TITLES[nb]} page", PAGE_NEEDS[nb]) for nb in notebooks
                         if nb in PAGE_NEEDS and not families.supports(config.model, PAGE_NEEDS[nb])}
        notebooks = [nb for nb in notebooks if nb not in not_available]
        report: dict[str, Any] = {"name": name, "params": str(params), "status": "running",
                                  "created": datetime.datetime.now().isoformat(timespec="seconds"),
                                  "pages": {}, "notebook_s": {}, "numbers": {}, "not_available": not_available,
                                  "notebooks": ran,
                                  "provenance": {**environment(), "run": []}}
        for line in not_available.values():
            logger.info("%s", line)
        started = time.perf_counter()
        for notebook in notebooks:
            executed = report_dir / f"{notebook}.ipynb"
            report["status"] = f"running {notebook}"
            _write_report_json(report_dir, report)
            logger.info("%s.ipynb: running -> %s", notebook, executed)
            began = time.perf_counter()
            try:
                execute(path_for_kernel(source / f"{notebook}.ipynb", cwd), executed,
                        {**chain[notebook], **extra.get(notebook, {})},
                        cwd=cwd, kernel_name=kernel_name, echo=echo)
            except Exception as error:
                from papermill.exceptions import PapermillExecutionError

                page = None
                if isinstance(error, PapermillExecutionError) and executed.is_file():
                    page = export_html(executed, show_code=show_code, title=f"{name}: {TITLES[notebook]} (failed)")
                    report["pages"][notebook] = page.name
                if isinstance(error, PapermillExecutionError):
                    failure = NotebookFailed(notebook, error, executed, page, report_dir)
                    summary = failure.summary()
                else:  # the kernel died or could not start, a cell timed out, ...
                    failure = ReportError(f"{notebook}.ipynb could not run: {type(error).__name__}: {error}. "
                                          f"What earlier steps wrote is kept in {report_dir}.")
                    summary = {"notebook": notebook, "cell": None, "error": f"{type(error).__name__}: {error}"}
                report.update(status="failed", failure=summary, wall_s=round(time.perf_counter() - started, 1),
                              numbers=run_numbers(report_dir / "run"))
                report["provenance"]["run"] = read_provenance(RunDir(report_dir / "run").provenance)
                report["notebook_s"][notebook] = round(time.perf_counter() - began, 1)
                _write_report_json(report_dir, report)
                write_index(reports_dir)
                raise failure from error
            page = export_html(executed, show_code=show_code, title=f"{name}: {TITLES[notebook]}")
            report["pages"][notebook] = page.name
            report["notebook_s"][notebook] = round(time.perf_counter() - began, 1)
            logger.info("%s.ipynb: done in %.0fs -> %s", notebook, report["notebook_s"][notebook], page)
        report.update(status="complete", wall_s=round(time.perf_counter() - started, 1),
                      numbers=run_numbers(report_dir / "run"))
        # where the code came from (at report start) and each training invocation's resolved settings
        report["provenance"]["run"] = read_provenance(RunDir(report_dir / "run").provenance)
        _write_report_json(report_dir, report)
        index = write_index(reports_dir)
        logger.info("report %s complete in %.0fs -> %s (index: %s)", name, report["wall_s"], report_dir, index)
        return report_dir


def report_size(report_dir: str | Path, include_checkpoints: bool = True) -> int:
    """Bytes under a report folder (optionally leaving out the run's checkpoints)."""
    total = 0
    checkpoints = RunDir(Path(report_dir) / "run").checkpoints
    for path in Path(report_dir).rglob("*"):
        if path.is_file() and (include_checkpoints or not path.is_relative_to(checkpoints)):
            total += path.stat().st_size
    return total
