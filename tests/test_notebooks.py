"""The shipped notebooks run headless, top to bottom, in a real Jupyter kernel."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


#: figures each notebook must (re)write under reports/
FIGURES = {"design_space.ipynb": ["design_space_pareto.png", "design_space_tokens_per_joule.png",
                                  "design_space_roofline.png", "design_space_layers.png"]}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.time()
    monkeypatch.setenv("SIMULATE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(FOLDER)}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for name in FIGURES.get(path.name, []):
        figure = FOLDER.parent / "reports" / name
        assert figure.stat().st_size > 10_000 and figure.stat().st_mtime >= started - 1
