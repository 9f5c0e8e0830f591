"""Notebooks are committed clean: one `parameters` cell, no outputs, a kernelspec papermill can use."""

import nbformat
import pytest

from llamaduo_nb.core.params import PROJECT_ROOT
from llamaduo_nb.stages import NOTEBOOKS

BOOKS = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))


def test_one_notebook_per_stage_in_order():
    assert [p.name for p in BOOKS] == sorted(NOTEBOOKS.values())
    assert [p.name[:2] for p in BOOKS] == [f"{i:02d}" for i in range(1, 9)]


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "params_file" in tagged[0].source and "run_dir" in tagged[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["language_info"]["name"] == "python"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("llamaduo_nb" in src for src in code)
    # thin: no cell a reader must scroll past
    assert max(len(src.splitlines()) for src in code) <= 12


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    from papermill.translators import PythonTranslator

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = {p.name for p in PythonTranslator.inspect(cell)}
    assert names == {"params_file", "run_dir", "overrides", "force"}


def test_an_executed_notebook_is_signed_as_its_users_own(tmp_path, monkeypatch):
    import shutil

    from nbformat.sign import NotebookNotary

    from llamaduo_nb.pipeline import runner

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))  # this test's own signature store
    executed = tmp_path / "08_report.ipynb"
    shutil.copy(BOOKS[-1], executed)
    assert not NotebookNotary().check_signature(nbformat.read(executed, as_version=4))
    runner.trust(executed)
    notebook = nbformat.read(executed, as_version=4)
    assert NotebookNotary().check_signature(notebook)  # JupyterLab renders its tables' styles
    notebook.cells[0].source += " changed"
    assert not NotebookNotary().check_signature(notebook)  # only what the run wrote is trusted
