"""Studies: sweeps written as a CSV table and PNG figures (python -m simulator.studies.X)."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from simulator.files import write_atomic


def out_folder(doc: str) -> Path:
    """The folder a study's `--out` names (default reports/), made if missing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default="reports", help="folder for the CSV and figures")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """`rows` (one dict per row, the first one's keys as header) as a CSV file, atomically."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, out.getvalue(), "--out")
