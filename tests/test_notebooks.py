"""Notebooks are committed clean: no outputs, no execution counts, parameters from the environment."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))


def test_the_six_notebooks_exist_in_order():
    names = [p.stem.split("_")[0] for p in NOTEBOOKS]
    assert names == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    dirty = [
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_reads_parameters_from_the_environment(path):
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    first_cells = "".join("".join(c["source"]) for c in code[:3])
    assert "os.environ.get(" in first_cells, f"{path.name}: no parameters cell near the top"
