"""train.ipynb's parameters cell against the Config: one typed, commented parameter per key.
Parses the committed notebook (nbformat + ast); runs nothing, so it is in the fast lane."""

import ast

import nbformat
import pytest

from dlm.core.config import keys, notebook_parameter
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
