"""The Colab quickstart (notebooks/quickstart.ipynb) runs top to bottom on CPU in test mode,
and stays in sync with its jupytext twin notebooks/quickstart.py."""

import os
import re
import time

import jupytext
import nbformat
from nbclient import NotebookClient

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


def outputs_of(notebook) -> tuple[str, list[str]]:
    """All text a notebook's code cells showed, and the MIME types of their outputs."""
    texts, mimes = [], []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                mimes += list(out.data)
                texts += [out.data.get("text/markdown", ""), out.data.get("text/plain", "")]
            elif out.output_type == "error":
                texts.append("\n".join(out.traceback))
    return "\n".join(texts), mimes


def test_quickstart_notebook_runs_in_test_mode(tmp_path, monkeypatch):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("LEAPALIGN_TEST_MODE", "1")
    monkeypatch.setenv("LEAPALIGN_WORKDIR", str(workdir))
    monkeypatch.setenv("LEAPALIGN_CACHE_DIR", str(cache))
    monkeypatch.setenv("FLUX_PATH", str(tmp_path / "no-flux-here"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("LEAPALIGN_REPO", raising=False)  # found from the notebook's folder
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    print(f"notebook executed in {time.perf_counter() - start:.1f} s")

    text, mimes = outputs_of(notebook)
    assert "test mode: True" in text
    assert f"repository: {ROOT}" in text
    installs = text.split("requirements to install:")[1].splitlines()[0].split()
    assert installs and not any(r.split(">")[0].split("=")[0] in ("jax", "jaxlib", "libtpu")
                                for r in installs), installs
    # The before/after table, shown as Markdown, and the summary read from results.json.
    assert "| model |" in text and "| base |" in text
    assert re.search(r"\| leapalign \(step \d+\) \|", text), text
    assert "acc_overall" in text and "-> aligned" in text
    # An image grid (IPython.display.Image) and the two matplotlib figures.
    assert mimes.count("image/png") >= 3, mimes
    assert "reward_mean" in text and "TensorBoard not started" in text
    assert "skipping the FLUX section: FLUX_PATH=" in text
    assert "--config.model.lora.rank=" in text
    # The run wrote to the temporary workdir and cache, not into the checkout.
    assert (workdir / "results.md").is_file() and list((workdir / "images").glob("*.png"))
    assert list(cache.glob("generator-*"))
