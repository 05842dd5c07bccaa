"""Fit the MatMul-free FPGA core's free parameters to the paper's "fitted" cases only.

    python -m simulator.calibration.fpga [--write]
    python -m simulator.calibration.fpga --without-startup   the model without its empirical term

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

import sys

from simulator.calibration.fit import (
    Parameter,
    fit,
    measure_with,
    number,
    publish,
    shipped_cases,
)


def calibrate() -> dict[str, float]:
    """Fit all three groups; returns {dotted path: value in the unit printed}."""
    cases = shipped_cases("mmfree_fpga.yaml")
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


UNITS = {"memory.dram.access_interval": "cycle", "cores.units.tmatmul.latency": "cycle",
         "host_link.transaction_time": "us", "power.idle": "W", "power.logic.full": "W"}
#: The parallel TMATMUL of the burst variant divides its time by 64 ([MMF] §5).
BURST_SPEEDUP = 64
FILES = ("fpga_1core", "fpga_8core", "fpga_16core", "fpga_26core", "fpga_1core_burst")


def formatted(values: dict[str, float]) -> dict[str, str]:
    """The fitted values as written in the YAML files (4 significant digits)."""
    return {path: f"{number(value)} {UNITS[path]}" for path, value in values.items()}


def without_startup() -> None:
    """Refit the access interval alone with the empirical TMATMUL start-up removed, and print
    what that model gives for every Table 3 block (d = 1024 still held out)."""
    cases = shipped_cases("mmfree_fpga.yaml")
    fixed = {"cores.units.tmatmul.latency": "0 cycle"}
    access = Parameter("memory.dram.access_interval", "cycle", 1.0, 1.0)
    (value,) = fit([cases["table3-block-d512"], cases["table3-block-d2048"]], [access], fixed)
    print(f"# without the TMATMUL start-up: {access.path}: {number(value)} cycle")
    for d in (512, 1024, 2048):
        case = cases[f"table3-block-d{d}"]
        simulated = measure_with(case, [access], [value], fixed)
        print(f"d = {d} ({case.role}): {simulated * 1e3:.4g} ms vs {case.reference * 1e3:.4g} ms "
              f"({simulated / case.reference - 1:+.1%})")


def main() -> None:
    if "--without-startup" in sys.argv[1:]:
        without_startup()
        return
    values = calibrate()
    files = {}
    for name in FILES:
        texts = formatted(values)
        if name.endswith("burst"):
            startup = values["cores.units.tmatmul.latency"] / BURST_SPEEDUP
            texts["cores.units.tmatmul.latency"] = f"{number(startup)} cycle"
        files[name] = texts
    publish("fitted on [MMF] Table 3 d = 512/2048 and Table 2 1- and 8-core points", files,
            sys.argv[1:])


if __name__ == "__main__":
    main()
