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
