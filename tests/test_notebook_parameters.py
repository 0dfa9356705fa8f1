"""train.ipynb's parameters cell against the Config: one typed parameter per key, commented with
Config's own comment for it. Parses the committed notebook (nbformat + ast); runs nothing, so it
is in the fast lane. `python -m dlm.workbench.shipped --update` writes them from Config."""

import ast

import nbformat
import pytest

from dlm.core.config import NOTEBOOK_OVERRIDES, keys, notebook_parameter, notebook_parameters
from tests.conftest import ROOT

TRAIN = ROOT / "notebooks" / "train.ipynb"


def parameters_cell(path) -> tuple[dict[str, ast.AnnAssign], list[str]]:
    """The tagged parameters cell's annotated assignments by name, and its source lines."""
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    tree = ast.parse(cell.source)
    names = {node.target.id: node for node in tree.body if isinstance(node, ast.AnnAssign)}
    return names, cell.source.splitlines()


@pytest.mark.parametrize("key", keys(), ids=lambda key: key.name)
def test_every_config_key_is_a_typed_commented_train_notebook_parameter(key):
    names, lines = parameters_cell(TRAIN)
    assert key.name in names, f"train.ipynb has no parameter '{key.name}'; add:\n{notebook_parameter(key)}"
    node = names[key.name]
    expected = notebook_parameter(key).split(" = ")[0].split(": ", 1)[1]  # Optional[int], ...
    assert ast.unparse(node.annotation) == expected, key.name
    assert isinstance(node.value, ast.Constant) and node.value.value is None, \
        f"{key.name}: None must mean 'the preset's value'"
    assert "#" in lines[node.lineno - 1], f"{key.name} has no comment (papermill --help-notebook shows it)"


def comment_of(line: str) -> str:
    """What follows the first '  # ' of a parameter line (no parameter's default holds one)."""
    return line.split("  # ", 1)[1] if "  # " in line else ""


@pytest.mark.parametrize("key", keys(), ids=lambda key: key.name)
def test_every_train_notebook_parameter_comment_is_configs_own(key):
    names, lines = parameters_cell(TRAIN)
    node = names[key.name]
    config_comment = key.comment or key.name.replace("_", " ")  # Config's comment lines for the key, joined
    shown = comment_of(lines[node.lineno - 1])
    assert shown.startswith(config_comment), (
        f"train.ipynb comments {key.name} as '{shown}', Config as '{config_comment}': the comment lives in "
        f"dlm/core/config.py; run python -m dlm.workbench.shipped --update to write it into the notebook")
    assert shown == notebook_parameter(key).split("  # ", 1)[1]  # and its choices after it, for a Literal key


def test_the_config_parameters_are_the_last_lines_of_the_cell_in_config_order():
    """After the NOTEBOOK_OVERRIDES line: one line per section and the section's keys, nothing else
    (a parameter added by hand between them would be lost at the next --update)."""
    nb = nbformat.read(TRAIN, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert NOTEBOOK_OVERRIDES in cell.source
    written = NOTEBOOK_OVERRIDES + cell.source.split(NOTEBOOK_OVERRIDES, 1)[1]
    assert written == notebook_parameters(), "run python -m dlm.workbench.shipped --update"
    order = [line.split(":")[0] for line in written.splitlines() if not line.startswith("#")]
    assert order == [key.name for key in keys()]


def test_update_writes_the_config_parameters_back_and_keeps_the_rest(tmp_path):
    from dlm.workbench.shipped import write_config_parameters

    copy = tmp_path / "train.ipynb"
    shipped_bytes = TRAIN.read_bytes()
    copy.write_bytes(shipped_bytes.replace(b"# embedding dimension d", b"# a comment edited by hand"))
    assert copy.read_bytes() != shipped_bytes
    assert write_config_parameters(copy) is True
    assert copy.read_bytes() == shipped_bytes  # the notebook's own parameters and every other cell as they were
    assert write_config_parameters(copy) is False
