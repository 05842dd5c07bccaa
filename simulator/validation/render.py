"""Print validation outcomes: paper value, simulated value, error, tolerance, PASS/FAIL."""

from __future__ import annotations

import json
import statistics

from rich import box
from rich.console import Console
from rich.table import Table

from simulator.validation.cases import GATES, ROLES, Empirical, Outcome


def _value(metric: str, value: float) -> str:
    if metric == "max_seq_len":
        return f"{value / 1024:g}K tokens"
    if metric == "bandwidth_bytes_per_s":
        return f"{value / 1e9:.4g} GB/s"
    if metric.endswith("_bytes"):
        return f"{value / 2**30:.4g} GiB"
    if metric.endswith("per_s"):
        return f"{value:.4g} /s"
    if metric.endswith("_s"):
        if value < 1e-3:
            return f"{value * 1e6:.4g} µs"
        return f"{value * 1e3:.4g} ms" if value < 1 else f"{value:.4g} s"
    if metric.endswith("_w"):
        return f"{value:.4g} W"
    return f"{value:.4g}"


def render_table(outcomes: list[Outcome], console: Console | None = None,
                 empirical: list[Empirical] | None = None) -> None:
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
    explained = [o for o in outcomes if o.case.note and (not o.gated
                                                         or o.case.role == "consistency")]
    for note in dict.fromkeys(o.case.note for o in explained):
        ids = ", ".join(o.case.id for o in explained if o.case.note == note)
        console.print(f"note ({ids}): {note}")
    _render_summary(outcomes, console)
    for line in group_lines(outcomes) + bias_lines(outcomes) + empirical_lines(
            outcomes, empirical or []):
        console.print(line)
    checked = [o for o in outcomes if o.gated]
    failed = [o for o in checked if not o.passed]
    known = sum(o.case.role == "open" for o in outcomes)
    console.print(f"{len(checked) - len(failed)} passed, {len(failed)} failed"
                  + (f" ({known} open: known misses, see notes)" if known else ""))


def summary(outcomes: list[Outcome]) -> list[dict[str, object]]:
    """Per role: cases, gated, passed, median and worst |error|, independent evidence and
    cases gated wider than the role's standard."""
    rows = []
    for role in ROLES:
        mine = [o for o in outcomes if o.case.role == role]
        if not mine:
            continue
        errors = [abs(o.error) for o in mine]
        gated = [o for o in mine if o.gated]
        rows.append({"role": role, "cases": len(mine), "gated": len(gated),
                     "passed": sum(o.passed for o in gated),
                     "standard_gate": GATES.get(role),
                     "widened": sum(o.case.widened for o in mine),
                     "median_abs_error": statistics.median(errors), "worst_abs_error": max(errors),
                     "independent": len(mine) if role == "held-out" else 0})
    return rows


def _render_summary(outcomes: list[Outcome], console: Console) -> None:
    table = Table(box=box.SIMPLE_HEAD, title="by role", title_justify="left")
    for column in ("role", "cases", "gate", "passed", "median |error|", "worst |error|",
                   "independent", "wider gate"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for row in summary(outcomes):
        gate = row["standard_gate"]
        table.add_row(str(row["role"]), str(row["cases"]),
                      f"±{gate:.0%}" if gate is not None else "—",
                      f"{row['passed']}/{row['gated']}" if row["gated"] else "—",
                      f"{row['median_abs_error']:.1%}", f"{row['worst_abs_error']:.1%}",
                      str(row["independent"]), str(row["widened"]))
    console.print(table)
    for outcome in outcomes:
        if outcome.case.widened:
            console.print(f"wider gate ({outcome.case.id}, ±{outcome.case.tolerance:.0%}): "
                          f"{outcome.case.gate_reason}")


def _groups(outcomes: list[Outcome]) -> dict[str, list[Outcome]]:
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        if outcome.case.group:
            groups.setdefault(outcome.case.group, []).append(outcome)
    return groups


def group_lines(outcomes: list[Outcome]) -> list[str]:
    """Median and worst |error| of each curve (e.g. FA-2's fitted and held-out points)."""
    lines = []
    for name, mine in _groups(outcomes).items():
        errors = [abs(o.error) for o in mine]
        roles = "/".join(dict.fromkeys(o.case.role for o in mine))
        lines.append(f"curve {name} ({roles}, {len(mine)} points): median |error| "
                     f"{statistics.median(errors):.1%}, worst {max(errors):.1%}")
    return lines


def bias_lines(outcomes: list[Outcome]) -> list[str]:
    """A line for each group of ≥ 3 cases whose errors all have one sign."""
    lines = []
    for name, mine in _groups(outcomes).items():
        errors = [o.error for o in mine]
        if len(errors) >= 3 and (all(e > 0 for e in errors) or all(e < 0 for e in errors)):
            lines.append(f"one-sided bias: {name}, all {len(errors)} errors "
                         f"{'positive' if errors[0] > 0 else 'negative'}, median "
                         f"{statistics.median(errors):+.1%}, range {min(errors):+.1%} … "
                         f"{max(errors):+.1%}")
    return lines


def empirical_lines(outcomes: list[Outcome], empirical: list[Empirical]) -> list[str]:
    """A line per curve-fit term, with what the cases run without it give."""
    by_id = {o.case.id: o for o in outcomes}
    lines = []
    for term in empirical:
        shown = [by_id[i] for i in term.without if i in by_id]
        without = "; ".join(f"{o.case.id} {_value(o.case.metric, o.simulated)} "
                            f"({o.error:+.1%})" for o in shown)
        lines.append(f"EMPIRICAL {term.parameter} ({', '.join(term.hardware)}): {term.reason}"
                     + (f" — without it: {without}" if without else ""))
    return lines


def to_json(outcomes: list[Outcome], empirical: list[Empirical] | None = None) -> str:
    rows = [{"id": o.case.id, "role": o.case.role, "metric": o.case.metric,
             "reference": o.case.reference, "simulated": o.simulated, "error": o.error,
             "tolerance": o.case.tolerance, "passed": o.passed, "source": o.case.source,
             "gate_reason": o.case.gate_reason, "formula": o.case.formula,
             "formula_source": o.case.formula_source, "group": o.case.group,
             "note": o.case.note} for o in outcomes]
    return json.dumps({"cases": rows, "summary": summary(outcomes),
                       "curves": group_lines(outcomes), "bias": bias_lines(outcomes),
                       "empirical": [term.model_dump() for term in empirical or []]},
                      indent=2, sort_keys=True)
