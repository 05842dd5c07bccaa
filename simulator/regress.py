"""CI regression on projected throughput: every shipped machine × the standard runs.

    simulate regress [--baseline FILE] [--hw-dir DIR] [--tolerance 0.01] [--update]

Recomputes latency, tokens/s and watts and compares them with `reports/baseline.csv`;
any that moved by more than the tolerance are printed as old, new and change, and the
command exits 1. `--update` rewrites the baseline (whole, atomically).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from simulator.api import simulate
from simulator.errors import UserError
from simulator.files import write_atomic
from simulator.hardware import shipped

#: (model, phase) run on every machine; prefill only where the machine has an L2 (GPUs).
STANDARD = (("1.3b", "decode"), ("llama2-7b", "decode"), ("llama2-7b", "prefill"))
METRICS = ("latency_s", "tokens_per_s", "power_w")
DEFAULT_BASELINE = Path(__file__).resolve().parents[1] / "reports" / "baseline.csv"


@dataclass(frozen=True)
class Change:
    key: tuple[str, str, str]
    metric: str
    old: float | None
    new: float | None

    @property
    def relative(self) -> float:
        if self.old is None or self.new is None:
            return float("inf")
        return (self.new - self.old) / self.old if self.old else float("inf")


def _hardware(hw_dir: Path | None) -> list[tuple[str, str | Path]]:
    """(file name, what to load) of every machine to run."""
    if hw_dir is None:
        return [(name, name) for name in shipped()]
    if not hw_dir.is_dir():
        raise UserError("--hw-dir", f"{hw_dir} is not a folder of hardware YAML files")
    return [(path.name, path) for path in sorted(hw_dir.glob("*.yaml"))]


def measure(hw_dir: Path | None = None) -> dict[tuple[str, str, str], dict[str, float]]:
    rows = {}
    for name, source in _hardware(hw_dir):
        for model, phase in STANDARD:
            if phase == "prefill":
                from simulator.hardware import load_hardware

                if load_hardware(source).memory.l2 is None:
                    continue
            result = simulate(source, model, phase=phase)  # type: ignore[arg-type]
            rows[(name, model, phase)] = {m: float(getattr(result, m)) for m in METRICS}
    return rows


def to_csv(rows: dict[tuple[str, str, str], dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["hardware", "model", "phase", *METRICS])
    for key in sorted(rows):
        writer.writerow([*key, *(repr(rows[key][m]) for m in METRICS)])
    return out.getvalue()


def read(path: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise UserError("--baseline", f"cannot read {path}; create it with "
                        "`simulate regress --update`") from None
    try:
        return {(r["hardware"], r["model"], r["phase"]): {m: float(r[m]) for m in METRICS}
                for r in csv.DictReader(io.StringIO(text))}
    except (KeyError, ValueError) as exc:
        raise UserError(str(path), f"not a baseline table ({exc})") from None


def compare(old: dict, new: dict, tolerance: float) -> list[Change]:
    changes = []
    for key in sorted(set(old) | set(new)):
        for metric in METRICS:
            before = old.get(key, {}).get(metric)
            after = new.get(key, {}).get(metric)
            change = Change(key, metric, before, after)
            if abs(change.relative) > tolerance:
                changes.append(change)
    return changes


def render(changes: list[Change]) -> str:
    lines = [f"{'hardware':<22}{'model':<11}{'phase':<9}{'metric':<14}{'old':>12}{'new':>12}"
             f"{'change':>10}"]
    for c in changes:
        old = "missing" if c.old is None else f"{c.old:.5g}"
        new = "missing" if c.new is None else f"{c.new:.5g}"
        moved = f"{c.relative:+.2%}" if c.relative != float("inf") else "—"
        lines.append(f"{c.key[0]:<22}{c.key[1]:<11}{c.key[2]:<9}{c.metric:<14}{old:>12}"
                     f"{new:>12}{moved:>10}")
    return "\n".join(lines)


def regress(baseline: Path, hw_dir: Path | None, tolerance: float, update: bool) -> int:
    if not 0 <= tolerance < 10:
        raise UserError("--tolerance", f"expected a fraction such as 0.01, not {tolerance}")
    rows = measure(hw_dir)
    if update:
        write_atomic(baseline, to_csv(rows), "--baseline")
        print(f"{len(rows)} runs written to {baseline}")
        return 0
    old = read(baseline)
    if hw_dir is not None:  # only the machines in the folder are regressed
        old = {key: value for key, value in old.items() if key[0] in {k[0] for k in rows}}
    changes = compare(old, rows, tolerance)
    if changes:
        print(f"{len({c.key for c in changes})} of {len(rows)} runs moved by more than "
              f"{tolerance:.1%}:")
        print(render(changes))
        return 1
    print(f"{len(rows)} runs within {tolerance:.1%} of {baseline}")
    return 0
