"""Helpers the notebooks call first: finding the project, resolving path parameters, logging and
plotting set-up, and turning a notebook's parameters into a Config.

Notebooks run with different working directories: papermill keeps the caller's (or --cwd),
JupyterLab starts the kernel in notebooks/. Relative path parameters therefore resolve the same way
in both: against the project root when the working directory is inside the project, else against
the working directory.
"""

from __future__ import annotations

import ast
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlm.core.config import Config, ConfigError, did_you_mean, field_types, load_config
from dlm.core.errors import UserError

logger = logging.getLogger("dlm")

# Output metadata of a figure redrawn in place while a notebook runs (train.ipynb's live loss
# curves): the report page leaves it out, since the page draws the final curves in their section.
LIVE_MARK = "dlm_live"


def is_project_root(path: Path) -> bool:
    return (path / "dlm" / "__init__.py").is_file() and (path / "params").is_dir()


def project_root(start: str | Path | None = None) -> Path | None:
    """The nearest folder at or above `start` (default: the working directory) that holds dlm/ and
    params/, or None outside a checkout."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if is_project_root(folder):
            return folder
    return None


def package_root() -> Path | None:
    """The checkout this dlm was imported from (an editable install), if it is one."""
    folder = Path(__file__).resolve().parents[2]
    return folder if is_project_root(folder) else None


def _shorten(path: Path, start: str | Path | None) -> Path:
    """Relative to the working directory when it lies under it (so paths printed or written by a
    notebook, e.g. into samples.jsonl, name no machine folder); `start` given: kept as is."""
    if start is not None:
        return path
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def resolve_path(path: str | Path, start: str | Path | None = None) -> Path:
    """Where a relative path parameter points: the project root when the working directory is
    inside the project (so 'runs/x' means the same from the root and from notebooks/), else the
    working directory. Absolute paths are kept."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    base = Path(start or Path.cwd()).resolve()
    return _shorten((project_root(base) or base) / path, start)


def resolve_input(path: str | Path, start: str | Path | None = None) -> Path:
    """An existing file or folder named by a parameter: tried relative to the working directory,
    then the project root, then the checkout dlm was imported from. The error names every place."""
    path = Path(path).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        base = Path(start or Path.cwd()).resolve()
        candidates = [base / path]
        for root in (project_root(base), package_root()):
            if root is not None and root / path not in candidates:
                candidates.append(root / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate if path.is_absolute() else _shorten(candidate, start)
    tried = ", ".join(f"'{c}'" for c in candidates)
    raise FileNotFoundError(f"'{path}' was not found (looked at {tried}).")


def setup(threads: int | None = None, level: int = logging.INFO) -> None:
    """Inside a notebook: log lines of the `dlm` logger as plain text on stdout (no widget progress
    bars), figures rendered inline as PNG, and optionally a fixed number of torch threads."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ConfigError(f"threads must be a number of threads, or 0 or None for torch's choice; got {threads!r}.")
    handler = next((h for h in logger.handlers if getattr(h, "_dlm_notebook", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stdout)
        handler._dlm_notebook = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.stream = sys.stdout  # the kernel may swap stdout between cells
    logger.setLevel(level)
    logger.propagate = False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        get_ipython = None
    shell = get_ipython() if get_ipython else None
    if shell is not None:
        # The inline backend is not interactive: figures become PNG outputs that papermill keeps
        # and nbconvert embeds. dlm.plots builds Figure objects without pyplot's global state.
        shell.run_line_magic("matplotlib", "inline")
    if threads:
        import torch

        torch.set_num_threads(threads)


def config_overrides(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Config keys set in a notebook's namespace (by its parameters cell, `-p` or `-f`), skipping
    None, which means: keep the preset's value."""
    keys = field_types()
    return {name: value for name, value in namespace.items() if name in keys and value is not None}


def notebook_config(params: str | Path | None, namespace: Mapping[str, Any], **forced: Any) -> Config:
    """The preset file `params` (empty: the Config defaults), then the Config keys the notebook's
    parameters set, then `forced` values (e.g. progress=False inside a notebook)."""
    path = resolve_input(params) if params else None
    overrides = {**config_overrides(namespace), **forced}
    if overrides:
        logger.info("config: %s%s", f"{path.name} + " if path else "defaults + ",
                    ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    return load_config(path, **overrides)


def trained_config(run_dir: str | Path) -> Config:
    """The config the run in `run_dir` was last trained with, what its pages show: last.pt's (its
    config.yaml plus what a resume may change, such as max_steps or lr), or config.yaml without one.
    A notebook's own config is only what it asked for: a resumed run keeps its recipe."""
    from dlm.core.checkpoint import load_checkpoint
    from dlm.core.config import from_dict, load_yaml
    from dlm.runs.rundir import RunDir

    run = RunDir(run_dir)
    if run.last_checkpoint.is_file():
        return from_dict(load_checkpoint(run.last_checkpoint, require=("config",))["config"])
    return from_dict(load_yaml(run.config))


def configuration_table(run_config: Config, asked: Config) -> tuple[Any, str | None]:
    """The run's own configuration, one row per key its family reads ('value'; the keys only other
    families read are left out), and one line naming each key asked for (`asked`: the preset and the
    notebook's parameters) that the run did not apply, with both values (None when it applied every
    one); the table then says the asked value beside the run's."""
    import pandas as pd

    from dlm.families import family, family_keys

    others = family_keys() - family(run_config.model).CONFIG_KEYS  # other families' keys: unread, at their defaults
    values = {key: value for key, value in run_config.to_dict().items() if key not in others}
    wanted = asked.to_dict()
    ignored = {key: wanted[key] for key in values if wanted[key] != values[key]}
    table = pd.Series(values, name="value").to_frame()
    if not ignored:
        return table, None
    table["asked, not applied"] = pd.Series({key: repr(value) for key, value in ignored.items()})
    table = table.fillna("")
    named = ", ".join(f"{key} {value!r} (the run's: {values[key]!r})" for key, value in ignored.items())
    return table, f"asked for but not applied (a resumed run keeps its recipe; the pages show the run's): {named}"


def split_list(value: str | list | tuple | None) -> list[str]:
    """A list parameter given as a list (papermill -y) or as comma-separated text (-p)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def chain_timesteps(config) -> int | None:
    """The timesteps of the run's discrete-time chain (its sampling steps are some of them); None
    for a continuous-time chain or none (its family's chain(config))."""
    from dlm.families import family

    chain = family(config.model).chain(config)
    return None if chain is None else chain.timesteps


def step_counts(value: str | list | tuple | None, total_steps: int | None, name: str = "curve_steps") -> list[int]:
    """Sampling step counts from a list parameter, keeping those the run can take (<= its chain's
    timesteps, `chain_timesteps`; None: any, a continuous-time family); anything that is not a
    positive integer is an error naming the parameter."""
    counts = []
    for part in split_list(value):
        try:
            count = int(part)
        except ValueError:
            raise UserError(f"Parameter '{name}' takes positive integers, e.g. '10,50,200'; got '{part}'.") from None
        if count < 1:
            raise UserError(f"Parameter '{name}' takes positive integers; got {count}.")
        counts.append(count)
    kept = sorted({c for c in counts if total_steps is None or c <= total_steps})
    if counts and not kept:
        raise UserError(f"Every entry of '{name}' exceeds the run's chain's timesteps ({total_steps}).")
    return kept


def short_names(paths: list[Path]) -> list[str]:
    """Labels for run folders in tables and legends: 'parent/name' (e.g. 'runs/default', 'smoke/run')."""
    return [f"{Path(p).parent.name}/{Path(p).name}" if Path(p).parent.name else Path(p).name for p in paths]


INJECTED_HEADER = "# Parameters\n"  # how papermill's injected-parameters cell begins


def assigned_names(source: str) -> list[str]:
    """Names a cell assigns at its top level (plain or annotated assignments)."""
    names = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def unknown_parameters(declared: list[str], injected: list[str], also_allowed: set[str] | frozenset = frozenset(),
                       notebook: str = "this notebook") -> None:
    """Raise a one-line ValueError for the first injected name the parameters cell does not declare
    (nor `also_allowed`), with the closest declared name, as the CLI does for a mistyped key."""
    allowed = set(declared) | set(also_allowed)
    for name in injected:
        if name not in allowed:
            raise UserError(f"Unknown parameter '{name}' for {notebook}.{did_you_mean(name, allowed)} "
                             f"Its parameters: {', '.join(declared)}.")


def check_parameters(also_allowed: set[str] | frozenset = frozenset(), notebook: str = "this notebook") -> None:
    """Under papermill: reject a `-p NAME` that the parameters cell does not declare. Papermill
    runs its injected-parameters cell right after the parameters cell, so both are in the kernel's
    input history; with no injected cell (JupyterLab, or no -p) there is nothing to check."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        return
    shell = get_ipython()
    history = list(shell.user_ns.get("In", [])) if shell is not None else []
    positions = [i for i, cell in enumerate(history) if cell.startswith(INJECTED_HEADER)]
    if not positions or positions[-1] == 0:
        return
    last = positions[-1]
    unknown_parameters(assigned_names(history[last - 1]), assigned_names(history[last]), also_allowed, notebook)


CONTROL_TASKS = ("infill", "prefix", "length", "guidance")  # control.ipynb's sections, in order


def control_tasks(value: str | list | tuple | None) -> list[str]:
    """control.ipynb's `task` parameter as a list; an unknown task is one line naming the known ones."""
    tasks = split_list(value)
    unknown = sorted(set(tasks) - set(CONTROL_TASKS))
    if unknown:
        raise UserError(f"Unknown task(s) {', '.join(unknown)}: use {', '.join(CONTROL_TASKS)}.")
    return tasks


def shows_task(model: str, task: str, asked: list[str]) -> bool:
    """Whether control.ipynb's section `task` runs (its caption shown): the family `model` has it and
    `task` asked for it. Else its one line says why (so a section is never an empty heading): the
    family's "not available: why", or that it was not asked for."""
    from dlm.workbench.captions import section

    return section(model, task, None if task in asked else
                   f"Not asked for: the task parameter ('{','.join(asked)}') leaves out {task} "
                   f"(the preset's control_tasks, or -p task).")


def sigma0(config) -> float | None:
    """The noise scale the embedding rows are held against (the training notebook's distance scale:
    the family's noise_scale, the Gaussian family's sigma0 of q(x0 | w)), or None for a family
    without the geometry."""
    from dlm.families import family, supports

    return family(config.model).noise_scale(config) if supports(config.model, "geometry") else None
