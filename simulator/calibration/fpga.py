"""Fit the MatMul-free FPGA core's free parameters to the paper's "fitted" cases only.

    python -m simulator.calibration.fpga

Three small fits, each linear in its parameters, each solved exactly from the full
simulator (not a closed formula) and printed as YAML to paste into hwconfigs/fpga_*.yaml:

1. block runtime: `memory.dram.access_interval` (core cycles per non-burst 8-bit DDR4
   access) and `cores.units.tmatmul.latency` (fixed start-up of a TMATMUL instruction),
   on Table 3 at d = 512 and 2048; d = 1024 is held out.
2. host → card input: `host_link.transaction_time` (one 8-byte MMIO write), on the 1-core
   Table 2 point; 8/16/26 cores are held out.
3. power: `power.idle` (board power outside the FPGA logic) and `power.logic.full`
   (static power of the whole logic fabric), on 1 and 8 cores; 16 and 26 are held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.validation.cases import Case, load_cases, measure, shipped_case_files


@dataclass(frozen=True)
class Parameter:
    path: str
    unit: str
    base: float
    step: float

    def value(self, x: float) -> str:
        return f"{x!r} {self.unit}"


def _cases() -> dict[str, Case]:
    path = next(p for p in shipped_case_files() if p.name == "mmfree_fpga.yaml")
    return {case.id: case for case in load_cases(path)}


def fit(cases: list[Case], parameters: list[Parameter],
        fixed: dict[str, str] | None = None, iterations: int = 8) -> list[float]:
    """Solve for parameters that make every case's metric hit its reference.

    Newton's method on the simulator itself: sample it at the current point and one step
    along each parameter, solve the linear system, repeat until the values settle (the
    metrics are affine within a schedule, so this converges in a few steps).
    """
    fixed = fixed or {}

    def run(case: Case, values: list[float]) -> float:
        overrides = {p.path: p.value(v) for p, v in zip(parameters, values, strict=True)}
        return measure(case.model_copy(update={"hw_set": {**case.hw_set, **fixed,
                                                           **overrides}}))

    values = [p.base for p in parameters]
    for _ in range(iterations):
        rows, rhs = [], []
        for case in cases:
            here = run(case, values)
            slopes = []
            for i, parameter in enumerate(parameters):
                moved = list(values)
                moved[i] += parameter.step
                slopes.append((run(case, moved) - here) / parameter.step)
            rows.append(slopes)
            rhs.append(case.reference - here)
        delta = np.linalg.solve(np.array(rows), np.array(rhs))
        values = [v + float(d) for v, d in zip(values, delta, strict=True)]
        if all(abs(d) <= 1e-9 * max(1.0, abs(v)) for d, v in zip(delta, values, strict=True)):
            break
    return values


def calibrate() -> dict[str, float]:
    """Fit all three groups; returns {dotted path: value in the unit printed}."""
    cases = _cases()
    block = [Parameter("memory.dram.access_interval", "cycle", 1.0, 1.0),
             Parameter("cores.units.tmatmul.latency", "cycle", 0.0, 100_000.0)]
    block_values = fit([cases["table3-block-d512"], cases["table3-block-d2048"]], block)
    fixed = {p.path: p.value(v) for p, v in zip(block, block_values, strict=True)}
    mmio = [Parameter("host_link.transaction_time", "us", 0.5, 0.5)]
    mmio_values = fit([cases["table2-ddr4-latency-1core"]], mmio, fixed)
    power = [Parameter("power.idle", "W", 1.0, 1.0), Parameter("power.logic.full", "W", 100.0,
                                                                 10.0)]
    power_values = fit([cases["table2-power-1core"], cases["table2-power-8core"]], power, fixed)
    values = {}
    for params, fitted in ((block, block_values), (mmio, mmio_values), (power, power_values)):
        values.update({p.path: v for p, v in zip(params, fitted, strict=True)})
    return values


def main() -> None:
    values = calibrate()
    print("# fitted on [MMF] Table 3 d = 512/2048 and Table 2 1- and 8-core points")
    units = {"memory.dram.access_interval": "cycle", "cores.units.tmatmul.latency": "cycle",
             "host_link.transaction_time": "us", "power.idle": "W", "power.logic.full": "W"}
    for path, value in values.items():
        print(f"{path}: {value:.6g} {units[path]}")


if __name__ == "__main__":
    main()
