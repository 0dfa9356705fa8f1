"""A report depends only on its preset and --params: dlm report refuses a notebook whose code was
edited (JupyterLab autosaves every edit into notebooks/), naming the cell, and records the code it ran."""

import json
import shutil

from dlm.cli import main
from dlm.workbench import shipped, workbook
from tests.conftest import ROOT


def test_the_record_is_the_notebooks_in_the_repository():
    """Fails when a notebook is changed without `python -m dlm.workbench.shipped --update`."""
    assert shipped.record(ROOT / "notebooks") == shipped.shipped()


def edit_parameters_cell(notebook, old: str, new: str) -> None:
    content = json.loads(notebook.read_text())
    cell = next(c for c in content["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"])
    assert old in source
    cell["source"] = source.replace(old, new)
    notebook.write_text(json.dumps(content))


def test_a_report_refuses_an_edited_notebook_naming_the_cell(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder)
    edit_parameters_cell(folder / "train.ipynb", "epochs: Optional[int] = None", "epochs: Optional[int] = 4")
    monkeypatch.setattr(workbook, "notebooks_dir", lambda: folder)
    monkeypatch.setattr(workbook, "execute", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(ROOT / "params" / "smoke.yaml"), "--reports_dir", "reports"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    cell = 1 + [i for i, source in enumerate(shipped.code_cells(folder / "train.ipynb")) if "epochs: Optional" in source][0]
    assert f"train.ipynb was edited: its code cell {cell} (" in err and "--param NOTEBOOK.KEY=VALUE" in err
    assert not (tmp_path / "reports").exists()


def test_outputs_and_metadata_are_not_edits(tmp_path, monkeypatch):
    """What JupyterLab writes on opening and saving (outputs, execution counts, metadata) changes no code."""
    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder)
    content = json.loads((folder / "sample.ipynb").read_text())
    content["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    for cell in content["cells"]:
        if cell["cell_type"] == "code":
            cell["execution_count"] = 7
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hello\n"}]
    (folder / "sample.ipynb").write_text(json.dumps(content, indent=2))
    shipped.check_as_shipped(folder / "sample.ipynb")
    assert shipped.digest(folder / "sample.ipynb") == shipped.digest(ROOT / "notebooks" / "sample.ipynb")
