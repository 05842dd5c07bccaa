"""Fit the FlashAttention-2 kernel's three free parameters on the A100 (fitted cases only).

    python -m simulator.calibration.flash [--write]

`scheduling.flash.efficiency` (tensor-core efficiency in its loops), `softmax_overlap`
(share of softmax work hidden under the matmuls) and `block_overhead` (a thread block's
prologue and epilogue), least squares over the "fitted" FA-2 points (seqlen 512, 2k, 4k,
16k of each panel); seqlen 1k and 8k are held out.
"""

from __future__ import annotations

import sys

from simulator.calibration.fit import Parameter, fit, number, publish, shipped_cases
from simulator.validation.cases import Case

PARAMETERS = [
    Parameter("scheduling.flash.efficiency", "", 0.8, 0.02, 0.05, 1.0),
    Parameter("scheduling.flash.softmax_overlap", "", 0.5, 0.05, 0.0, 1.0),
    Parameter("scheduling.flash.block_overhead", "cycle", 1000.0, 200.0, 0.0, 1e6),
]


def fitted_cases() -> list[Case]:
    return [case for case in shipped_cases("flashattention2_a100.yaml").values()
            if case.id.startswith("fa2-") and case.role == "fitted"]


def calibrate(start: list[float] | None = None, iterations: int = 10) -> dict[str, float]:
    """Least-squares values from the parameters' generic starts (or from `start`)."""
    values = fit(fitted_cases(), PARAMETERS, iterations=iterations, start=start)
    return {p.path: v for p, v in zip(PARAMETERS, values, strict=True)}


FILES = ("gpu_a100", "gpu_a100_40gb", "gpu_a100_pcie", "gpu_h100", "gpu_h200", "gpu_rtx3090",
         "gpu_l40s")


def formatted(values: dict[str, float]) -> dict[str, str]:
    """The fitted values as written in the YAML files (4 significant digits)."""
    return {p.path: number(values[p.path]) + (f" {p.unit}" if p.unit else "")
            for p in PARAMETERS}


def main() -> None:
    texts = formatted(calibrate())
    publish("fitted on FlashAttention-2 Fig. 4 (A100), seqlen 512/2k/4k/16k of each panel",
            dict.fromkeys(FILES, texts), sys.argv[1:])


if __name__ == "__main__":
    main()
