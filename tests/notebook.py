"""Runs the Colab quickstart (notebooks/quickstart.ipynb) in this Python's kernel."""

import os
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


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


def execute() -> tuple[str, list[str]]:
    """Executes the notebook top to bottom (environment as set by the caller); returns
    `outputs_of` it. Raises CellExecutionError naming the cell on any error."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    start = time.perf_counter()
    client.execute()
    print(f"notebook executed in {time.perf_counter() - start:.1f} s")
    return outputs_of(notebook)
