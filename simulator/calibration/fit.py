"""Least-squares fitting of hardware parameters against reference cases, on the simulator.

Gauss-Newton on relative errors: sample the simulator at the current values and one step
along each parameter, solve the linearised least-squares problem, take the step (halved
until it lowers the error), repeat until the values settle. With as many cases as
parameters the fit is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from simulator.validation.cases import Case, load_cases, measure, shipped_case_files


@dataclass(frozen=True)
class Parameter:
    """A dotted YAML path, the unit its value is written in, a start, a step and bounds."""

    path: str
    unit: str
    base: float
    step: float
    low: float = -np.inf
    high: float = np.inf

    def value(self, x: float) -> str | float:
        return f"{x!r} {self.unit}" if self.unit else x


def number(value: float) -> str:
    """A fitted value as written in YAML: 4 significant digits, no exponent."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def shipped_cases(file_name: str) -> dict[str, Case]:
    path = next(p for p in shipped_case_files() if p.name == file_name)
    return {case.id: case for case in load_cases(path)}


def measure_with(case: Case, parameters: list[Parameter], values: list[float],
                 fixed: dict[str, str]) -> float:
    """The case's metric with `parameters` at `values` and `fixed` set over its hw_set."""
    overrides = {p.path: p.value(v) for p, v in zip(parameters, values, strict=True)}
    return measure(case.model_copy(update={"hw_set": {**case.hw_set, **fixed, **overrides}}))


def rms_error(cases: list[Case], parameters: list[Parameter], values: list[float],
              fixed: dict[str, str] | None = None) -> float:
    """Root-mean-square relative error over `cases` with `parameters` at `values`."""
    errors = [(measure_with(case, parameters, values, fixed or {}) - case.reference)
              / case.reference for case in cases]
    return float(np.sqrt(np.mean(np.square(errors))))


#: Times a Gauss-Newton step is halved before the fit stops.
HALVINGS = 8


def fit(cases: list[Case], parameters: list[Parameter], fixed: dict[str, str] | None = None,
        iterations: int = 10, start: list[float] | None = None) -> list[float]:
    """Parameter values minimising Σ ((simulated − reference) / reference)² over `cases`,
    from each parameter's `base` (or from `start`)."""
    fixed = fixed or {}
    values = list(start) if start is not None else [p.base for p in parameters]
    for _ in range(iterations):
        rows, rhs = [], []
        for case in cases:
            here = measure_with(case, parameters, values, fixed)
            slopes = []
            for i, parameter in enumerate(parameters):
                moved = list(values)
                # step inwards at the upper bound (some values, e.g. a clock, have a ceiling)
                step = parameter.step if values[i] + parameter.step <= parameter.high else (
                    -parameter.step)
                moved[i] += step
                slopes.append((measure_with(case, parameters, moved, fixed) - here)
                              / step / case.reference)
            rows.append(slopes)
            rhs.append((case.reference - here) / case.reference)
        delta = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
        # a step is taken only where it lowers the error, halved until it does (the
        # simulator is piecewise: a tile choice or a max() of pipes changes under it)
        now = float(np.sum(np.square(rhs)))
        for _ in range(HALVINGS):
            trial = [float(np.clip(v + d, p.low, p.high))
                     for v, d, p in zip(values, delta, parameters, strict=True)]
            if rms_error(cases, parameters, trial, fixed) ** 2 * len(cases) < now:
                break
            delta = delta / 2
        else:
            break
        values = trial
        if all(abs(d) <= 1e-7 * max(1.0, abs(v)) for d, v in zip(delta, values, strict=True)):
            break
    return values


def write_values(path: Path, values: dict[str, str]) -> None:
    """Rewrite the values of dotted keys in a YAML file in place, keeping comments/layout.

    Only block-style keys (one `key: value` per line) are supported; a missing key raises.
    """
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    stack: list[tuple[int, str]] = []
    found = set()
    for number, line in enumerate(lines):
        stripped = line.lstrip(" ")
        if not stripped.strip() or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        key = stripped.split(":", 1)[0].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        if dotted in values:
            body, sep, comment = line.partition("#")
            text = f"{body[: body.index(':') + 1]} {values[dotted]}"
            lines[number] = f"{text.ljust(len(body) - 1)} #{comment}" if sep else f"{text}\n"
            found.add(dotted)
    missing = set(values) - found
    if missing:
        raise KeyError(f"{path}: no key {', '.join(sorted(missing))}")
    path.write_text("".join(lines), encoding="utf-8")


def publish(title: str, files: dict[str, dict[str, str]], argv: list[str]) -> None:
    """Print the fitted values (those of the first file) and, with --write, write each
    file's values into hwconfigs/."""
    print(f"# {title}")
    for path, text in next(iter(files.values())).items():
        print(f"{path}: {text}")
    if "--write" in argv:
        folder = Path(str(resources.files("hwconfigs")))
        for name, texts in files.items():
            write_values(folder / f"{name}.yaml", texts)
        print(f"written to {', '.join(files)} in {folder}")
