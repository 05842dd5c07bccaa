"""The shipped notebooks run headless, top to bottom, in a real Jupyter kernel."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


#: figures each notebook must (re)write (under reports/, or SIMULATE_REPORTS_DIR)
FIGURES = {"design_space.ipynb": ["design_space_pareto.png", "design_space_tokens_per_joule.png",
                                  "design_space_roofline.png", "design_space_layers.png"],
           "serving.ipynb": ["serving_cdf.png", "serving_rate.png", "serving_flover.png"]}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started = time.time()
    shipped = {p: p.stat().st_mtime_ns for p in (FOLDER.parent / "reports").iterdir()}
    monkeypatch.setenv("SIMULATE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("SIMULATE_REPORTS_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(FOLDER)}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for name in FIGURES.get(path.name, []):
        figure = tmp_path / name
        assert figure.stat().st_size > 10_000 and figure.stat().st_mtime >= started - 1
    # the source tree is never written by a test
    assert {p: p.stat().st_mtime_ns for p in (FOLDER.parent / "reports").iterdir()} == shipped
