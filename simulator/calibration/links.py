"""Fit link efficiencies on the collectives `system-measurements.md` gives for fitting.

    python -m simulator.calibration.links

The cases are simulator/validation/data/collectives.yaml: each `fitted` case fits the
`links.0.efficiency` of its system (N2: dgx_a100.yaml; N1: dgx_h100.yaml), and the
`held-out` ones (N3) are only predicted. At large messages a ring collective's busbw is
the link rate × efficiency up to latency terms, so each fit is one ratio, solved through
the event simulation (not the closed form) by rescaling until the simulated busbw meets
the measured one.
"""

from __future__ import annotations

from simulator.calibration.fit import shipped_cases
from simulator.validation.cases import Case, measure

CASES = "collectives.yaml"


def fit_efficiency(case: Case) -> float:
    """The `links.0.efficiency` at which the case's simulated busbw equals its reference."""
    efficiency = 1.0
    for _ in range(4):  # busbw ∝ efficiency up to the latency terms: converges at once
        trial = case.model_copy(update={"hw_set": {**case.hw_set,
                                                   "links.0.efficiency": efficiency}})
        efficiency = min(1.0, efficiency * case.reference / measure(trial))
    return efficiency


def main() -> None:
    for case in shipped_cases(CASES).values():
        if case.role == "fitted":
            print(f"{case.hardware}: links.0.efficiency: {fit_efficiency(case):.4f}   "
                  f"# FITTED on {case.id}")
        else:
            got = measure(case)
            print(f"{case.role} {case.id}: {got / 1e9:.1f} GB/s vs {case.reference / 1e9:.0f} "
                  f"({got / case.reference - 1:+.1%})")


if __name__ == "__main__":
    main()
