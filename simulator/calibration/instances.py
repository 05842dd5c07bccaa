"""Fit how FasterTransformer's concurrent instances share an A100 (Flover's baseline).

    python -m simulator.calibration.instances [--write]

`overheads.instances.device_share` and `contention` (simulator.hardware.schema:
ConcurrentInstances), least squares on the relative errors of the `fitted` speed-ups in
simulator/validation/data/flover_fig4.yaml (N = 2, 8 and 32 requests of GPT-J 6B and of
LLaMA-13B; N = 4 and 16 of both, and the TP columns, are held out). A speed-up is the
`instances` makespan over the `flover` one on the same engine. The step times do not
depend on the two parameters, so each case's steps are simulated once and the serving
loop alone is rerun: a coarse grid, then a finer one around its best point, twice.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from simulator.calibration.fit import number, publish, shipped_cases
from simulator.serving.loop import Options
from simulator.serving.requests import load_spec
from simulator.serving.serve import run_serving
from simulator.validation.cases import Case, _strings

SHARE, CONTENTION = "overheads.instances.device_share", "overheads.instances.contention"


def fitted_cases() -> list[Case]:
    return [case for case in shipped_cases("flover_fig4.yaml").values()
            if case.metric == "serving_speedup" and case.role == "fitted"]


class Speedups:
    """The cases' speed-ups at given parameter values, their step times memoized."""

    def __init__(self, cases: list[Case]) -> None:
        self.cases = cases
        self.memo: dict[tuple[str, str | None, int], dict[Any, Any]] = {}
        self.flover = [self._makespan(case, case.serving.scheduler, {})  # type: ignore[union-attr]
                       for case in cases]

    def _makespan(self, case: Case, scheduler: str, hw_set: dict[str, Any]) -> float:
        assert case.serving is not None
        memo = self.memo.setdefault((case.hardware, case.model, case.tp), {})
        done = run_serving(case.hardware, case.model or "", load_spec(
            case.serving.requests, case.id), Options(scheduler=scheduler,
                                                     bucket=case.serving.bucket),
            model_set=_strings(case.model_set), tp=case.tp, runtime=case.runtime,
            hw_set={**case.hw_set, **hw_set} or None, memo=memo)
        return float(done.summary["makespan_s"])

    def errors(self, share: float, contention: float) -> np.ndarray:
        """Relative errors of the cases' speed-ups with the parameters at these values."""
        values = {SHARE: share, CONTENTION: contention}
        return np.array([self._makespan(case, "instances", values) / flover / case.reference
                         - 1.0 for case, flover in zip(self.cases, self.flover, strict=True)])


def calibrate(rounds: int = 3) -> dict[str, float]:
    """The least-squares values on the fitted cases: grids of 11 × 11 points, each round
    centred on the last best point at a fifth of the last spacing."""
    speedups = Speedups(fitted_cases())
    share, contention = 0.5, 0.005
    width = (0.5, 0.005)
    for _ in range(rounds):
        grid = [(s, c) for s in np.linspace(share - width[0], share + width[0], 11)
                for c in np.linspace(contention - width[1], contention + width[1], 11)
                if 0.0 <= s <= 1.0 and c >= 0.0]
        share, contention = min(grid, key=lambda p: float(np.sum(np.square(
            speedups.errors(*p)))))
        width = (width[0] / 5, width[1] / 5)
    return {SHARE: float(share), CONTENTION: float(contention)}


def main() -> None:
    values = calibrate()
    texts = {path: number(value) for path, value in values.items()}
    publish("fitted on Flover Fig. 4 speed-ups, N = 2, 8, 32 of GPT-J 6B and LLaMA-13B (A100)",
            {"gpu_a100": texts}, sys.argv[1:])
    errors = Speedups(fitted_cases()).errors(values[SHARE], values[CONTENTION])
    for case, error in zip(fitted_cases(), errors, strict=True):
        print(f"  {case.id}: {error:+.1%}")


if __name__ == "__main__":
    main()
