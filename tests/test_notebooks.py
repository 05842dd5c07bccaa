"""The shipped notebooks' code cells run top to bottom (headless)."""

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(path: Path) -> None:
    matplotlib.use("Agg")
    cells = json.loads(path.read_text())["cells"]
    code = [("".join(cell["source"])) for cell in cells if cell["cell_type"] == "code"]
    assert code
    namespace: dict[str, object] = {}
    for number, source in enumerate(code):
        exec(compile(source, f"{path.name}[{number}]", "exec"), namespace)
