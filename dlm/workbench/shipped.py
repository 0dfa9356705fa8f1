"""The notebooks as shipped: a report depends only on its preset and its --params, never on an edit
made to notebooks/*.ipynb in JupyterLab (which autosaves). SHIPPED (shipped_notebooks.json beside
this file) holds the SHA-256 of each code cell's source of every notebook in notebooks/; dlm report
refuses a notebook whose code differs from it, naming the cell, and records the digests it ran.

After changing a notebook on purpose, or a Config key or its comment, refresh the record
(tests/test_shipped_notebooks.py fails until then):

    python -m dlm.workbench.shipped --update

which first writes train.ipynb's Config parameters from Config (dlm.core.config.notebook_parameters:
one typed, commented parameter per key; tests/test_notebook_parameters.py checks them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from dlm.core.config import NOTEBOOK_OVERRIDES, notebook_parameters
from dlm.core.data import atomic_write_bytes

SHIPPED = Path(__file__).with_name("shipped_notebooks.json")
CONFIG_NOTEBOOK = "train.ipynb"  # the notebook whose parameters cell takes every Config key


class EditedNotebook(ValueError):
    """A notebook whose code differs from the shipped one; the message names the cell."""


def code_cells(notebook: Path) -> list[str]:
    """The sources of a notebook's code cells, in order (markdown, outputs and metadata, which
    JupyterLab rewrites on every save, do not change what a report computes)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for cell in cells if cell["cell_type"] == "code"]


def digests(notebook: Path) -> list[str]:
    return [hashlib.sha256(source.encode("utf-8")).hexdigest() for source in code_cells(notebook)]


def digest(notebook: Path) -> str:
    """One digest for the notebook's code, as report.json records it."""
    return hashlib.sha256("".join(digests(notebook)).encode()).hexdigest()[:16]


def shipped() -> dict[str, list[str]]:
    return json.loads(SHIPPED.read_text(encoding="utf-8"))


def check_as_shipped(notebook: Path) -> None:
    """Raise EditedNotebook when `notebook`'s code is not the shipped code of its name."""
    expected = shipped().get(notebook.name)
    if expected is None:
        raise EditedNotebook(f"{notebook} is not one of the notebooks dlm ships ({', '.join(sorted(shipped()))}).")
    found, sources = digests(notebook), code_cells(notebook)
    for index, (have, want) in enumerate(zip(found, expected), start=1):
        if have != want:
            first = next((line.strip() for line in sources[index - 1].splitlines() if line.strip()), "(empty)")
            raise EditedNotebook(
                f"{notebook} was edited: its code cell {index} ({first[:60]}) differs from the shipped notebook, "
                f"and a report must depend only on its preset and --param. Give the change as --param "
                f"NOTEBOOK.KEY=VALUE (or in the preset), and undo the edit (git checkout {notebook.name} in "
                f"notebooks/), or run the edited notebook with papermill yourself.")
    if len(found) != len(expected):
        raise EditedNotebook(f"{notebook} was edited: it has {len(found)} code cells where the shipped notebook has "
                             f"{len(expected)}. Undo the edit (git checkout {notebook.name} in notebooks/), or run "
                             f"the edited notebook with papermill yourself.")


def write_config_parameters(notebook: Path) -> bool:
    """Write the Config parameters of `notebook`'s parameters cell (from the NOTEBOOK_OVERRIDES line
    to the end of the cell) from Config; the lines above it are the notebook's own. True when they
    changed."""
    import nbformat

    content = nbformat.read(notebook, as_version=4)
    (cell,) = [c for c in content.cells if "parameters" in c.metadata.get("tags", [])]
    own, found, _ = cell.source.partition(NOTEBOOK_OVERRIDES)
    if not found:
        raise ValueError(f"{notebook}'s parameters cell has no line '{NOTEBOOK_OVERRIDES}' to write Config's keys after.")
    source = own + notebook_parameters()
    if source == cell.source:
        return False
    cell.source = source
    atomic_write_bytes(notebook, (nbformat.writes(content) + "\n").encode())
    return True


def record(folder: Path) -> dict[str, list[str]]:
    return {path.name: digests(path) for path in sorted(folder.glob("*.ipynb"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check or refresh the record of the shipped notebooks' code.")
    parser.add_argument("--update", action="store_true",
                        help=f"write {CONFIG_NOTEBOOK}'s Config parameters from Config, then the record from notebooks/ "
                             f"as it is now")
    args = parser.parse_args(argv)
    folder = Path(__file__).resolve().parents[2] / "notebooks"
    if args.update:
        if write_config_parameters(folder / CONFIG_NOTEBOOK):
            print(f"wrote the Config parameters of {CONFIG_NOTEBOOK} from dlm.core.config.Config")
        now = record(folder)
        atomic_write_bytes(SHIPPED, (json.dumps(now, indent=1, sort_keys=True) + "\n").encode())
        print(f"recorded {len(now)} notebooks -> {SHIPPED.name}")
        return 0
    now = record(folder)
    stale = sorted(name for name in now.keys() | shipped().keys() if now.get(name) != shipped().get(name))
    print("the record matches notebooks/" if not stale else f"differs from the record: {', '.join(stale)}")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
