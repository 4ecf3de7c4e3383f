"""The Colab quickstart (notebooks/quickstart.ipynb) stays in sync with its jupytext twin
notebooks/quickstart.py. (It is executed in test mode by test_toy_pipeline.py, on the
tiny world built there.)"""

import os

import jupytext
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
TWIN = os.path.join(ROOT, "notebooks", "quickstart.py")


def cells(notebook) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_notebook_and_its_py_twin_are_in_sync():
    ipynb = nbformat.read(NOTEBOOK, as_version=4)
    twin = jupytext.read(TWIN)
    fix = "run `jupytext --sync notebooks/quickstart.py` (or --to ipynb) after editing"
    assert [s for t, s in cells(ipynb) if t == "code"] == \
        [s for t, s in cells(twin) if t == "code"], f"code cells differ: {fix}"
    assert cells(ipynb) == cells(twin), f"markdown cells differ: {fix}"
    # A committed notebook carries no stale outputs.
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in ipynb.cells if c.cell_type == "code"), "clear the notebook's outputs"
