"""The notebooks run top to bottom in their small setting (as CI does)."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == [
      "flax_linen_cnn.ipynb", "paper_reproduction.ipynb", "quickstart.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv("SNGD_NOTEBOOK_FULL", "0")
  notebook = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  elapsed = time.perf_counter() - start
  print(f"{path.name}: {elapsed:.0f} s")
  outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "Error" not in outputs, outputs[-2000:]
