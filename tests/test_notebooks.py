"""Every notebook in ``notebooks/`` is stored without outputs and runs top to bottom.

Executed with nbclient on the ``python3`` kernel (the venv's ipykernel: jupyter_client starts
it with this interpreter), in a fresh working directory, with one wall-clock budget per
notebook. New notebooks are picked up by the glob.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
BUDGET_S = 150  # per notebook; each is meant to take well under a minute on one core


def test_the_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_explain_a_model.ipynb", "03_concepts_paths_gates.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} is stored with outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has a count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the kernel
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + BUDGET_S
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        # each cell may use what is left of the notebook's budget
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        allow_errors=False,
    )
    t0 = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - t0
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count is not None for c in ran)
    errors = [o for c in ran for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s"
