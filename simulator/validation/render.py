"""Print validation outcomes: paper value, simulated value, error, tolerance, PASS/FAIL."""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.table import Table

from simulator.validation.cases import Outcome


def _value(metric: str, value: float) -> str:
    if metric.endswith("_bytes"):
        return f"{value / 2**30:.4g} GiB"
    if metric.endswith("per_s"):
        return f"{value:.4g} /s"
    if metric.endswith("_s"):
        return f"{value * 1e3:.4g} ms"
    if metric.endswith("_w"):
        return f"{value:.4g} W"
    return f"{value:.4g}"


def render_table(outcomes: list[Outcome], console: Console | None = None) -> None:
    console = console or Console(width=160)
    table = Table(box=box.SIMPLE_HEAD, title="validation against published values",
                  title_justify="left")
    for column in ("case", "role", "paper", "simulated", "error", "tolerance", ""):
        table.add_column(column, justify="left" if column in ("case", "role") else "right")
    for outcome in outcomes:
        case = outcome.case
        status = ("PASS" if outcome.passed else "FAIL") if outcome.gated else "—"
        table.add_row(case.id, case.role, _value(case.metric, case.reference),
                      _value(case.metric, outcome.simulated), f"{outcome.error:+.1%}",
                      f"±{case.tolerance:.0%}" if outcome.gated else "", status)
    console.print(table)
    notes = dict.fromkeys(f"{o.case.note}" for o in outcomes if not o.gated)
    for note in notes:
        ids = ", ".join(o.case.id for o in outcomes if not o.gated and o.case.note == note)
        console.print(f"note ({ids}): {note}")
    checked = [o for o in outcomes if o.gated]
    failed = [o for o in checked if not o.passed]
    known = sum(o.case.role == "open" for o in outcomes)
    console.print(f"{len(checked) - len(failed)} passed, {len(failed)} failed"
                  + (f" ({known} open: known misses, see notes)" if known else ""))


def to_json(outcomes: list[Outcome]) -> str:
    rows = [{"id": o.case.id, "role": o.case.role, "metric": o.case.metric,
             "reference": o.case.reference, "simulated": o.simulated, "error": o.error,
             "tolerance": o.case.tolerance, "passed": o.passed, "source": o.case.source,
             "note": o.case.note} for o in outcomes]
    return json.dumps(rows, indent=2, sort_keys=True)
